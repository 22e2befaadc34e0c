"""Offline helpers for tests, examples and the benchmark: a tiny vision-language model with its
processor (tokenizer trained locally with ``tokenizers``), tiny PNGs, and image+text rows.

The model is a Gemma 3 image-text model (SigLIP vision tower): its processor loads with PIL only.
(Qwen2.5-VL's processor also needs a video processor, which transformers builds only with
torchvision; the plugin itself is model-agnostic and uses whatever ``processor.image_token`` says.)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

BOI, EOI, SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
WORDS = ("red green blue yellow square circle picture shows small large bright dark left right above below "
         "the a of in on with and scanned page figure caption document").split()


def build_tiny_vl(path: str | Path, texts: list[str] | None = None, *, image_size: int = 32, patch_size: int = 8,
                  tokens_per_image: int = 4, hidden_size: int = 64, layers: int = 2, vocab_size: int = 400,
                  seed: int = 0) -> Path:
    """Save a random tiny Gemma3ForConditionalGeneration + Gemma3Processor at ``path``."""
    import torch
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil,
                              Gemma3Processor, PreTrainedTokenizerFast)

    from host.testing import build_tokenizer, sample_texts

    path = Path(path)
    if (path / "config.json").exists() and (path / "processor_config.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    base = build_tokenizer((texts or []) + sample_texts() + [" ".join(WORDS)], path, vocab_size=vocab_size)
    base.add_special_tokens({"additional_special_tokens": [BOI, EOI, SOFT]})
    tok = PreTrainedTokenizerFast(
        tokenizer_object=base._tokenizer, eos_token="<|endoftext|>", pad_token="<|pad|>",
        extra_special_tokens={"boi_token": BOI, "eoi_token": EOI, "image_token": SOFT},
    )
    image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=tokens_per_image)
    processor.save_pretrained(str(path))
    cfg = Gemma3Config(
        text_config=dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=len(tok),
                         max_position_embeddings=1024, sliding_window=128),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=patch_size),
        mm_tokens_per_image=tokens_per_image, boi_token_index=tok.convert_tokens_to_ids(BOI),
        eoi_token_index=tok.convert_tokens_to_ids(EOI), image_token_index=tok.convert_tokens_to_ids(SOFT),
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    Gemma3ForConditionalGeneration(cfg).save_pretrained(str(path))
    return path


def make_png(path: str | Path, size: tuple[int, int] = (24, 24), color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    from PIL import Image, ImageDraw

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, color)
    ImageDraw.Draw(img).rectangle([size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2], fill=(255, 255, 255))
    img.save(path)
    return path


COLORS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 230, 20)}


def make_rows(image_dir: str | Path, n: int, *, placeholder: str = BOI, seed: int = 0, text_every: int = 4,
              prefix: str = "img", size: tuple[int, int] = (24, 24)) -> list[dict]:
    """``n`` rows; every row but each ``text_every``-th has one unique image whose colour the text names."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        color = rng.choice(sorted(COLORS))
        if text_every and i % text_every == text_every - 1:
            rows.append({"text": f"a plain page of text number {i} about the {color} figure.", "images": []})
            continue
        name = f"{prefix}{i:05d}.png"
        make_png(Path(image_dir) / name, size, COLORS[color])
        rows.append({"text": f"the picture shows a {color} square. {placeholder} caption: {color} square {i}.",
                     "images": [name]})
    return rows


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mm_config(model_dir, output_dir, **overrides) -> dict:
    """A small full-fine-tuning config for the tiny VL model; add the route's data keys."""
    cfg = {
        "base_model": str(model_dir),
        "processor_type": "AutoProcessor",
        "plugins": ["mmcpt"],
        "sequence_len": 64,
        "micro_batch_size": 4,
        "learning_rate": 3e-3,
        "lr_scheduler": "constant",
        "logging_steps": 1,
        "output_dir": str(output_dir),
        "bf16": False,
        "seed": 0,
    }
    cfg.update(overrides)
    return cfg


def summary(out: str | Path) -> dict:
    return json.loads((Path(out) / "run_summary.json").read_text())


def entry(data_root: str | Path, **kw) -> dict:
    """A multimodal_pretrain entry for ``data_root/data.jsonl`` with images under ``data_root/images``."""
    data_root = Path(data_root)
    return {"path": str(data_root / "data.jsonl"), "type": "multimodal_pretrain",
            "image_base_dir": str(data_root / "images"), **kw}


def pretokenize(rows: list[dict], processor, add_eos: bool = True) -> list[dict]:
    """Already-tokenized rows (the ``skip_prepare_dataset`` route) made with the processor's tokenizer."""
    from host_plugin_mmcpt.encode import ImageTokenSpec, mask_labels

    spec = ImageTokenSpec.from_processor(processor)
    out = []
    for r in rows:
        text = r["text"] + (processor.tokenizer.eos_token if add_eos else "")
        ids = list(processor.tokenizer(text)["input_ids"])
        out.append({"_mm_text": text, "images": r["images"], "input_ids": ids, "attention_mask": [1] * len(ids),
                    "labels": mask_labels(ids, set(spec.masked_ids))})
    return out
