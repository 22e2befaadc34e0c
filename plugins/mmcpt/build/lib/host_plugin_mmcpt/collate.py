"""Batch-time image loading and processing for prepared multimodal rows."""

from __future__ import annotations

import logging
from typing import Any

from host.errors import DataError

from host_plugin_mmcpt import encode as enc
from host_plugin_mmcpt import images as img_mod

log = logging.getLogger("host.mmcpt")

#: Processor outputs that are bookkeeping, not model inputs.
_NOT_MODEL_INPUTS = {"num_crops", "image_sizes_orig", "pixel_attention_mask_orig"}
_TYPE_ID_KEYS = ("token_type_ids", "mm_token_type_ids")


class MultimodalCollator:
    """Rows -> model batch: decode each row's images, run the processor on text + images (the
    tokenizer alone for all-text batches), right-pad, and mask labels (padding, image tokens, the
    processor's layout tokens). A processor failure is retried row by row to name the bad row."""

    def __init__(self, cfg, tokenizer, processor):
        enc.check_tokenizer(tokenizer, processor)
        self.cfg, self.tokenizer, self.processor = cfg, tokenizer, processor
        self.spec = enc.ImageTokenSpec.from_processor(processor)
        self.masked = sorted(set(self.spec.masked_ids))
        self.skip_bad = cfg.skip_bad_rows
        self.timeout = cfg.remote_image_timeout
        self.not_inputs = _NOT_MODEL_INPUTS | set(getattr(processor, "unused_input_names", None) or [])
        self.type_id_keys = [k for k in _TYPE_ID_KEYS if k in (getattr(processor, "model_input_names", None) or [])]
        self.stats = {"batches": 0, "image_batches": 0, "images": 0, "tokens": 0, "dropped_rows": 0}

    @staticmethod
    def where(row: dict) -> str:
        return f"{row.get(enc.SRC, 'dataset')}: row {row.get(enc.ROW, '?')}"

    def _load(self, row: dict) -> list:
        base = row.get(enc.BASE) or None
        remote = bool(row.get(enc.REMOTE))
        return [img_mod.load_image(ref, base, remote, self.where(row), self.timeout) for ref in row.get(enc.IMAGES) or []]

    def _pad_args(self) -> dict[str, Any]:
        if self.cfg.pad_to_sequence_len:
            return {"padding": "max_length", "max_length": self.cfg.sequence_len}
        return {"padding": "longest"}

    def _encode(self, texts: list[str], images: list[list]) -> dict:
        kwargs = dict(return_tensors="pt", padding_side="right", **self._pad_args())
        if not any(images):
            out = dict(self.tokenizer(texts, **kwargs))
            for key in self.type_id_keys:
                out[key] = out["input_ids"].new_zeros(out["input_ids"].shape)
            return out
        out = dict(self.processor(text=texts, images=images, **kwargs))
        self.stats["image_batches"] += 1
        return out

    def _name_bad_row(self, rows, texts, images, exc: Exception):
        for row, text, imgs in zip(rows, texts, images):
            try:
                self._encode([text], [imgs])
            except Exception as row_exc:
                return DataError(
                    f"{self.where(row)}: the processor failed on this row (images {row.get(enc.IMAGES)}): "
                    f"{type(row_exc).__name__}: {row_exc}"
                )
        return DataError(f"the processor failed on a batch of rows {[self.where(r) for r in rows]}: "
                         f"{type(exc).__name__}: {exc}")

    def __call__(self, rows: list[dict]) -> dict:
        kept, images = [], []
        for row in rows:
            try:
                images.append(self._load(row))
                kept.append(row)
            except img_mod.UnsafeImageRef:
                raise
            except img_mod.BadImage as exc:
                if not self.skip_bad:
                    raise
                self._drop(exc)
        return self._collate(kept, images)

    def _collate(self, kept: list[dict], images: list[list]) -> dict:
        import torch

        texts = [r[enc.MM_TEXT] for r in kept]
        if not kept:
            raise DataError("every row of a batch was bad (skip_bad_rows); check the warnings above.")
        try:
            out = self._encode(texts, images)
        except Exception as exc:
            err = self._name_bad_row(kept, texts, images, exc)
            raise err from None
        lengths = out["attention_mask"].sum(dim=1)
        too_long = [i for i, n in enumerate(lengths.tolist()) if n > self.cfg.sequence_len]
        if too_long:
            msgs = [f"{self.where(kept[i])}: {int(lengths[i])} tokens after image expansion, more than "
                    f"sequence_len={self.cfg.sequence_len}" for i in too_long]
            if not self.skip_bad:
                raise DataError(msgs[0] + "; raise sequence_len or set skip_bad_rows: true.")
            for m in msgs:
                self._drop(m)
            keep = [i for i in range(len(kept)) if i not in too_long]
            if not keep:
                raise DataError("every row of a batch was too long (skip_bad_rows); raise sequence_len.")
            return self._collate([kept[i] for i in keep], [images[i] for i in keep])
        out = {k: v for k, v in out.items() if k not in self.not_inputs}
        if out["input_ids"].shape[1] > self.cfg.sequence_len:  # longest padding never exceeds; max_length may
            raise DataError(f"a batch is {out['input_ids'].shape[1]} tokens wide, more than sequence_len.")
        labels = out["input_ids"].clone()
        labels[out["attention_mask"] == 0] = -100
        labels[torch.isin(labels, torch.tensor(self.masked, dtype=labels.dtype))] = -100
        out["labels"] = labels
        self.stats["batches"] += 1
        self.stats["images"] += sum(len(i) for i in images)
        self.stats["tokens"] += int(lengths.sum())
        return out

    def _drop(self, reason) -> None:
        self.stats["dropped_rows"] += 1
        if self.stats["dropped_rows"] <= 3:
            log.warning("mmcpt: dropped a bad row at batch time (skip_bad_rows): %s", reason)
