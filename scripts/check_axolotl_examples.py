"""Do axolotl's published example configs validate with host? (issue 14's acceptance measure)

    pip download --no-deps --no-binary=:all: axolotl==0.21.0 -d /tmp/axo && tar xzf /tmp/axo/axolotl-0.21.0.tar.gz -C /tmp/axo
    python scripts/check_axolotl_examples.py /tmp/axo/axolotl-0.21.0/examples [--json out.json]

Picks the SFT configs of the families this project targets (Qwen3 / Qwen3-MoE / Qwen3.5, gpt-oss,
Mixtral, Gemma 3/4, vision, LoRA/QLoRA, FSDP), replaces only ``base_model`` with a local tiny model
dir, and runs the real ``host validate`` on each from the sdist's root (so relative ``deepspeed:``
paths resolve as they do for axolotl users). Prints a table: validates or not, and every message.
Nothing from axolotl is copied into the repo; the configs are read from the given directory.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

FAMILIES = [
    "qwen3/*", "qwen3.5/*", "gpt-oss/*", "gemma3/*", "gemma4/*", "mistral/mixtral/*", "mistral/*",
    "llama-3-vision/*", "qwen2_5-vl/*", "qwen2-vl/*", "llama-3/*",
]
# Not supervised fine-tuning of a model as published, so out of scope (host trains SFT/pretraining).
OUT_OF_SCOPE = ("rl", "qat", "reward_model", "process_reward_model", "use_ray", "diffusion", "ebft",
                "tensor_parallel_size", "context_parallel_size", "fp8", "llmcompressor")


def select(examples: Path) -> list[Path]:
    picked = []
    for pattern in FAMILIES:
        for f in sorted(glob.glob(str(examples / pattern))):
            if not f.endswith((".yml", ".yaml")):
                continue
            data = yaml.safe_load(Path(f).read_text())
            if isinstance(data, dict) and "base_model" in data and not any(data.get(k) for k in OUT_OF_SCOPE):
                picked.append(Path(f))
    return picked


#: (substring of the published base_model id, lower case) -> the model_type of its tiny stand-in, first match wins,
#: so family checks (liger's kernels per family, MoE rules) answer for the config's own family
FAMILY_TYPES = [
    ("gpt-oss", "gpt_oss"), ("mixtral", "mixtral"), ("mistral", "mistral"), ("gemma-4", "gemma4_text"),
    ("gemma4", "gemma4_text"), ("gemma-3", "gemma3_text"), ("gemma3", "gemma3_text"), ("qwen3.5", "qwen3_5_moe"), ("qwen3.6", "qwen3_5_moe"),
    ("qwen3-30b-a3b", "qwen3_moe"), ("qwen3-235b", "qwen3_moe"), ("qwen3-coder", "qwen3_moe"), ("qwen3", "qwen3"),
    ("llama", "llama"),
]


def family_type(base_model: str) -> str:
    name = str(base_model).lower()
    return next((t for key, t in FAMILY_TYPES if key in name), "qwen3")


def tiny_model(path: Path, model_type: str = "qwen3") -> Path:
    """A small random causal LM of ``model_type`` with a tokenizer, saved like a hub model (validate reads no
    weights); a type this transformers cannot build as a causal LM falls back to qwen3."""
    from host.testing import build_model, build_tokenizer, sample_texts

    tok = build_tokenizer(sample_texts(), path / "tokenizer")
    try:
        return build_model(model_type, path / model_type, tok)
    except Exception as exc:  # noqa: BLE001 - a stand-in only; say which family was not checked
        print(f"note: no tiny {model_type} ({type(exc).__name__}); using qwen3 for it", file=sys.stderr)
        return build_model("qwen3", path / "qwen3", tok)


def plugins_needed(data: dict) -> list[str]:
    return [p for p in data.get("plugins") or [] if isinstance(p, str)]


def check(config: Path, model: Path, root: Path, host: str, work: Path) -> dict:
    data = yaml.safe_load(config.read_text())
    data["base_model"] = str(model)
    path = work / (config.parent.name + "__" + config.name)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    # the configs are for GPUs; Triton's interpreter lets GPU-only plugins (liger) validate on a CPU machine
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRITON_INTERPRET": "1"}
    proc = subprocess.run([host, "validate", str(path)], capture_output=True, text=True, cwd=root, env=env, timeout=300)
    # a failed run's report: "error: <file>: N problems" + grouped "    - " lines, or one "error: " line;
    # warnings follow under "warnings (not errors):"
    head, _, tail = proc.stderr.partition("warnings (not errors):")
    errors = []
    if proc.returncode:
        errors = re.findall(r"^    - (.*)$", head, re.M) or [
            line.removeprefix("error: ") for line in head.splitlines() if line.startswith("error: ")
        ] or [head.strip()[-300:]]
    warnings = re.findall(r"^    - (.*)$", tail, re.M) + [
        line.removeprefix("warning: ") for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    return {
        "config": str(config.relative_to(root / "examples")),
        "validates": proc.returncode == 0,
        "exit_code": proc.returncode,
        "errors": errors,
        "warnings": warnings,
        "plugins": plugins_needed(data),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("examples", type=Path, help="axolotl 0.21.0 sdist's examples/ directory")
    ap.add_argument("--host", default=str(Path(sys.executable).with_name("host")), help="the host CLI to run")
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "axolotl_examples.json")
    args = ap.parse_args()
    host = str(Path(args.host).absolute()) if os.sep in args.host else args.host  # validate runs from the sdist's root
    examples = args.examples.resolve()
    configs = select(examples)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models: dict[str, Path] = {}
        results = []
        for c in configs:
            kind = family_type((yaml.safe_load(c.read_text()) or {}).get("base_model", ""))
            if kind not in models:
                models[kind] = tiny_model(work / "tiny", kind)
            results.append(check(c, models[kind], examples.parent, host, work) | {"stand_in": kind})
    ok = sum(r["validates"] for r in results)
    width = max(len(r["config"]) for r in results)
    print(f"{'config':<{width}}  validates  problems")
    for r in results:
        print(f"{r['config']:<{width}}  {'yes' if r['validates'] else 'NO':<9}  {len(r['errors'])}")
        for e in r["errors"]:
            print(f"{'':<{width}}    - {e}")
    print(f"\n{ok}/{len(results)} validate ({100 * ok / len(results):.0f}%)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"validated": ok, "total": len(results), "results": results}, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
