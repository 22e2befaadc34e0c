"""Build the quickstart's model from files in this repo: a BPE tokenizer trained on
examples/data/corpus.jsonl and a randomly initialised ~5M-parameter Qwen3-MoE.

Usage: python examples/make_tiny_moe.py [OUT_DIR]   (default: examples/assets/tiny-qwen3-moe)
"""

import json
import sys
from pathlib import Path

from host.testing import build_model, build_tokenizer

HERE = Path(__file__).parent


def main(out: Path) -> None:
    if (out / "config.json").exists():
        print(f"{out} exists; nothing to do")
        return
    texts = [json.loads(line)["text"] for line in (HERE / "data" / "corpus.jsonl").open()]
    tokenizer = build_tokenizer(texts, out, vocab_size=2048)
    build_model(
        "qwen3_moe", out, tokenizer, seed=0,
        hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, intermediate_size=512,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "assets" / "tiny-qwen3-moe")
