"""Every shipped example config validates against the host and its plugins (all installed here)."""

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def _stage(example: Path, cwd: Path) -> None:
    """Empty stand-ins, relative to the test's cwd, for the model directories under examples/assets
    that scripts build on demand (`validate` checks only that a local base_model exists)."""
    cfg = yaml.safe_load(example.read_text())
    for key in ("base_model", "tokenizer"):
        if isinstance(cfg.get(key), str) and cfg[key].startswith("examples/assets/"):
            (cwd / cfg[key]).mkdir(parents=True, exist_ok=True)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_validates(path, run_host, tmp_path):
    _stage(path, tmp_path)  # run_host runs in tmp_path
    result = run_host("validate", path)
    assert result.exit_code == 0, result.output
    assert "base_model:" in result.output


def test_example_with_missing_model_names_it(run_host):
    """Without its model built, an example fails validation with the path named (exit 2)."""
    result = run_host("validate", REPO / "examples" / "quickstart.yaml")
    assert result.exit_code == 2 and "base_model: examples/assets/tiny-qwen3-moe does not exist" in result.output
