"""Build the tiny Gemma 4 models that examples/gemma4-*.yaml train, from files in this repo.

Usage: python plugins/gemma4/make_tiny_gemma4.py [dense|moe|all]
Writes examples/assets/tiny-gemma4-dense and examples/assets/tiny-gemma4-moe (random weights,
a BPE tokenizer trained on examples/data/corpus.jsonl). Offline, a few seconds on CPU.
"""

import json
import sys
from pathlib import Path

from host.testing import build_tokenizer

from host_plugin_gemma4 import tiny

ROOT = Path(__file__).resolve().parents[2]


def main(which: str = "all") -> None:
    texts = [json.loads(line)["text"] for line in (ROOT / "examples" / "data" / "corpus.jsonl").open()]
    for kind in ("dense", "moe") if which == "all" else (which,):
        out = ROOT / "examples" / "assets" / f"tiny-gemma4-{kind}"
        if (out / "config.json").exists():
            print(f"{out} exists; nothing to do")
            continue
        tok = build_tokenizer(texts, out, vocab_size=2048)
        # multimodal wrapper (Gemma4ForConditionalGeneration, model_type gemma4) like the real checkpoints
        tiny.build(out, tok, multimodal=True, moe=kind == "moe", layers=6, hidden=128, heads=4, kv_heads=2,
                   head_dim=32, global_head_dim=64, kv_shared=2, per_layer_input=16, sliding_window=32)
        print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "all")
