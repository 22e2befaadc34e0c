"""Build everything the examples/mmcpt-*.yaml configs need, offline, under examples/assets/:

- examples/assets/tiny-vl: a random tiny Gemma 3 image-text model with its processor (a BPE
  tokenizer trained locally + the PIL image processor);
- examples/assets/mmcpt/images/*.png: small generated PNGs;
- examples/assets/mmcpt/data.jsonl (raw rows), pretok.jsonl (already tokenized rows) and
  shards/part-*.jsonl (the streaming route's input).

Usage (from the repo root): python plugins/mmcpt/examples_assets.py
"""

from __future__ import annotations

import sys
from pathlib import Path

from host_plugin_mmcpt import testing as mmt


def main(root: Path) -> None:
    from transformers import AutoProcessor

    assets = root / "examples" / "assets"
    model = mmt.build_tiny_vl(assets / "tiny-vl", hidden_size=64, layers=2)
    data = assets / "mmcpt"
    rows = mmt.make_rows(data / "images", 400, seed=1)
    mmt.write_jsonl(data / "data.jsonl", rows)
    processor = AutoProcessor.from_pretrained(str(model))
    mmt.write_jsonl(data / "pretok.jsonl", mmt.pretokenize(rows, processor))
    for k in range(4):
        mmt.write_jsonl(data / "shards" / f"part-{k}.jsonl", rows[k * 100 : (k + 1) * 100])
    print(f"wrote {model} and {data}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2])
