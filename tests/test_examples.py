"""Every shipped example config validates against the host and its plugins (all installed here)."""

from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_validates(path, run_host):
    result = run_host("validate", path)
    assert result.exit_code == 0, result.output
    assert "base_model:" in result.output
