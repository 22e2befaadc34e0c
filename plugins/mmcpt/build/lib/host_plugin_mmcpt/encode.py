"""Tokenizing one multimodal row (shared by the non-streaming and streaming routes), validating
pre-tokenized rows, and the processor facts everything else relies on."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from host.errors import ConfigError, DataError

from host_plugin_mmcpt import images as img_mod

log = logging.getLogger("host.mmcpt")

#: Layout tokens some processors put around or in place of images; masked from labels when the
#: tokenizer has them as special tokens.
KNOWN_LAYOUT_TOKENS = (
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<start_of_image>", "<end_of_image>", "<image_soft_token>", "<image>", "<|image|>", "<video>",
    "<fake_token_around_image>", "<global-img>", "<|img|>", "<|begin_of_image|>", "<|end_of_image|>",
    "<img>", "</img>", "<IMG_CONTEXT>", "<boi>", "<eoi>",
)
_TOKEN_ATTRS = ("image_token", "boi_token", "eoi_token", "video_token", "vision_start_token", "vision_end_token",
                "image_start_token", "image_end_token", "fake_image_token", "global_image_token")

#: Columns every prepared row carries besides input_ids/attention_mask/labels.
MM_TEXT, IMAGES, BASE, REMOTE, SRC, ROW = "_mm_text", "images", "_mm_base", "_mm_remote", "_mm_src", "_mm_row"


#: The placeholder most image+text datasets use; in a row for a processor whose token differs, it is a mistake.
GENERIC_PLACEHOLDER = "<image>"


class BadRow(DataError):
    """A row that cannot be trained on as configured; dropped and counted under skip_bad_rows."""


def check_tokenizer(tokenizer, processor) -> None:
    if processor is None:
        raise ConfigError(
            "processor_type: multimodal_pretrain needs a processor; set processor_type: AutoProcessor "
            "(or the model's processor class)."
        )
    ptok = getattr(processor, "tokenizer", None)
    if ptok is None:
        raise ConfigError(f"processor_type: {type(processor).__name__} has no tokenizer; use the model's full processor.")
    if tokenizer is not ptok:
        raise ConfigError(
            "tokenizer: multimodal_pretrain requires the tokenizer to be processor.tokenizer, so that image "
            "placeholder ids and label masks match what the processor produces; remove `tokenizer:` from the config."
        )


@dataclass
class ImageTokenSpec:
    """What the processor expects in text for an image, and which ids never get a loss."""

    placeholder: str  # the processor's own placeholder string
    placeholder_id: int
    masked_ids: list[int]
    #: tokens an image adds to a row beyond its placeholder: (tokens at calibration size) - n_image(size)
    extra_per_image: int | None = None
    calibrated: dict = field(default_factory=dict)

    @classmethod
    def from_processor(cls, processor) -> ImageTokenSpec:
        tok = processor.tokenizer
        placeholder = getattr(processor, "image_token", None) or getattr(tok, "image_token", None)
        if not placeholder:
            raise ConfigError(
                f"processor_type: {type(processor).__name__} declares no image_token; multimodal_pretrain cannot "
                f"know the image placeholder. Use a vision-language processor."
            )
        ids = tok(placeholder, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ConfigError(
                f"processor_type: the processor's image token {placeholder!r} is not a single token of its tokenizer "
                f"({ids}); add it as a special token."
            )
        masked = set()
        for obj in (processor, tok):
            for attr in _TOKEN_ATTRS:
                value = getattr(obj, attr, None)
                if isinstance(value, str) and value:
                    tid = tok.convert_tokens_to_ids(value)
                    if isinstance(tid, int) and tid != tok.unk_token_id:
                        masked.add(tid)
            for attr in ("image_token_id", "video_token_id", "boi_token_id", "eoi_token_id"):
                value = getattr(obj, attr, None)
                if isinstance(value, int):
                    masked.add(value)
        for value in getattr(processor, "image_token_ids", None) or []:
            if isinstance(value, int):
                masked.add(value)
        special = set(tok.all_special_tokens) | set(getattr(tok, "added_tokens_encoder", {}) or {})
        for name in KNOWN_LAYOUT_TOKENS:
            if name in special:
                masked.add(tok.convert_tokens_to_ids(name))
        masked.add(ids[0])
        spec = cls(placeholder=placeholder, placeholder_id=ids[0], masked_ids=sorted(masked))
        spec._calibrate(processor)
        return spec

    def _calibrate(self, processor) -> None:
        """Learn how many tokens one image adds, from one synthetic image (never user data)."""
        from PIL import Image

        counter = getattr(processor, "_get_num_multimodal_tokens", None)
        if counter is None:
            log.warning("mmcpt: %s cannot count image tokens; rows are length-checked at batch time only",
                        type(processor).__name__)
            return
        try:
            size = (64, 64)
            out = processor(text=[self.placeholder], images=[[Image.new("RGB", size)]])
            n_total = len(out["input_ids"][0])
            n_text = len(processor.tokenizer(self.placeholder)["input_ids"])
            n_img = int(counter(image_sizes=[size]).num_image_tokens[0])
        except Exception as exc:  # a processor with unusual call conventions: fall back to batch-time checks
            log.warning("mmcpt: could not calibrate image token counts (%s); rows are length-checked at batch time",
                        exc)
            return
        self.extra_per_image = n_total - n_text - n_img
        self.calibrated = {"size": list(size), "n_total": n_total, "n_text": n_text, "n_img": n_img}
        self._counter = counter

    def image_tokens(self, sizes: list[tuple[int, int]]) -> int:
        """Tokens the images of one row add to it (beyond their placeholders)."""
        if self.extra_per_image is None or not sizes:
            return 0
        counts = self._counter(image_sizes=[list(s) for s in sizes]).num_image_tokens
        return int(sum(counts)) + self.extra_per_image * len(sizes)


def processor_fingerprint(processor, spec: ImageTokenSpec) -> dict[str, Any]:
    """Everything about the processor that changes prepared rows or batches."""
    from host.data import tokenizer_fingerprint

    try:
        settings = processor.to_dict()
    except Exception:
        settings = {}
    settings.pop("tokenizer", None)
    image_proc = getattr(processor, "image_processor", None)
    try:
        image_settings = image_proc.to_dict() if image_proc is not None else None
    except Exception:
        image_settings = str(image_proc)
    blob = json.dumps({"processor": settings, "image_processor": image_settings}, sort_keys=True, default=str)
    return {
        "class": type(processor).__name__,
        "image_processor_class": type(image_proc).__name__ if image_proc is not None else None,
        "tokenizer": tokenizer_fingerprint(processor.tokenizer),
        "image_token": spec.placeholder,
        "image_token_id": spec.placeholder_id,
        "masked_ids": spec.masked_ids,
        "extra_per_image": spec.extra_per_image,
        "settings": hashlib.sha256(blob.encode()).hexdigest(),
    }


def mask_labels(ids: list[int], masked: set[int]) -> list[int]:
    return [-100 if t in masked else t for t in ids]


class RowEncoder:
    """Turns one raw row into a prepared row, or raises :class:`BadRow` / a safety error."""

    def __init__(self, cfg, entry, tokenizer, spec: ImageTokenSpec, base: str | None, timeout: float):
        self.cfg, self.entry, self.tok, self.spec, self.base, self.timeout = cfg, entry, tokenizer, spec, base, timeout
        self.data_token = entry.image_token or spec.placeholder
        self.masked = set(spec.masked_ids)
        if entry.add_eos and tokenizer.eos_token is None:
            raise ConfigError("add_eos: the tokenizer has no eos_token; set add_eos: false on the dataset entry.")

    def _images(self, row, where: str) -> list[str]:
        value = row.get(self.entry.image_column)
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise BadRow(f"{where}: column {self.entry.image_column!r} must be a list of image paths, got {value!r}.")
        return list(value)

    def _check_refs(self, refs: list[str], where: str) -> list[tuple[int, int]]:
        sizes = []
        for ref in refs:
            if self.entry.measure_images:
                sizes.append(img_mod.image_size(ref, self.base, self.entry.allow_remote_images, where, self.timeout))
            else:
                img_mod.resolve(ref, self.base, self.entry.allow_remote_images, where)
        return sizes

    def _finish(self, ids, labels, text, refs, sizes, where, src, index) -> dict[str, Any]:
        seq = self.cfg.sequence_len
        length = len(ids) + self.spec.image_tokens(sizes)
        if length > seq:
            raise BadRow(
                f"{where}: {length} tokens (text and images), more than sequence_len={seq}; rows are never truncated "
                f"(that would cut images). Raise sequence_len, shorten the row, or set skip_bad_rows: true."
            )
        return {
            "input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels,
            MM_TEXT: text, IMAGES: refs, BASE: self.base or "", REMOTE: self.entry.allow_remote_images,
            SRC: src, ROW: index,
        }

    def encode(self, row: dict, index: int, src: str) -> dict[str, Any]:
        where = f"{src}: row {index}"
        text = row.get(self.entry.text_column)
        if not isinstance(text, str):
            raise BadRow(f"{where}: column {self.entry.text_column!r} must be a string, got {type(text).__name__}.")
        refs = self._images(row, where)
        if self.data_token != self.spec.placeholder and self.spec.placeholder in text:
            raise BadRow(
                f"{where}: column {self.entry.text_column!r} holds the processor's own image token "
                f"{self.spec.placeholder!r} besides the configured image_token {self.data_token!r}; use only "
                f"{self.data_token!r} to mark images (one per image)."
            )
        if self.entry.image_token is None and GENERIC_PLACEHOLDER != self.spec.placeholder and GENERIC_PLACEHOLDER in text:
            raise BadRow(
                f"{where}: column {self.entry.text_column!r} holds {GENERIC_PLACEHOLDER!r}, which is not this processor's "
                f"image token {self.spec.placeholder!r}. If it marks images, set image_token: {GENERIC_PLACEHOLDER!r} on "
                f"the dataset entry (and use only that); otherwise remove it from the text."
            )
        n = text.count(self.data_token)
        if n and not refs and self.entry.image_column not in row:
            raise BadRow(
                f"{where}: {n} image placeholder(s) {self.data_token!r} in the text, but the row has no "
                f"{self.entry.image_column!r} column (it has {sorted(row)}); give the images there, or set "
                f"image_column on the dataset entry."
            )
        if n != len(refs):
            raise BadRow(
                f"{where}: {n} image placeholder(s) {self.data_token!r} in column {self.entry.text_column!r} but "
                f"{len(refs)} image(s) in column {self.entry.image_column!r}; each image needs exactly one placeholder."
            )
        if self.data_token != self.spec.placeholder:
            text = text.replace(self.data_token, self.spec.placeholder)
        if self.entry.add_eos:
            text = text + self.tok.eos_token
        sizes = self._check_refs(refs, where)
        ids = list(self.tok(text)["input_ids"])
        if ids.count(self.spec.placeholder_id) != len(refs):
            raise BadRow(f"{where}: the tokenizer did not keep each {self.spec.placeholder!r} as one token.")
        return self._finish(ids, mask_labels(ids, self.masked), text, refs, sizes, where, src, index)

    def validate_pretokenized(self, row: dict, index: int, src: str) -> dict[str, Any]:
        """Check an already-tokenized row's shape; keep it as it is (plus the routing columns)."""
        where = f"{src}: row {index}"
        text = row.get(MM_TEXT, row.get(self.entry.text_column))
        if not isinstance(text, str):
            raise BadRow(f"{where}: needs the kept text in {MM_TEXT!r} (or {self.entry.text_column!r}).")
        refs = self._images(row, where)
        cols = {}
        for key in ("input_ids", "attention_mask", "labels"):
            value = row.get(key)
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) for v in value) or not value:
                raise BadRow(f"{where}: {key!r} must be a non-empty list of integers, got {value!r}.")
            cols[key] = list(value)
        ids, mask, labels = cols["input_ids"], cols["attention_mask"], cols["labels"]
        if not len(ids) == len(mask) == len(labels):
            raise BadRow(f"{where}: input_ids/attention_mask/labels have lengths {len(ids)}/{len(mask)}/{len(labels)}; "
                         f"they must be equal.")
        if any(m not in (0, 1) for m in mask):
            raise BadRow(f"{where}: attention_mask may hold only 0 and 1.")
        if any(lab != -100 and lab != t for lab, t in zip(labels, ids)):
            raise BadRow(f"{where}: labels must equal input_ids or be -100 at every position.")
        vocab = len(self.tok)
        if any(t < 0 or t >= vocab for t in ids):
            raise BadRow(f"{where}: input_ids hold ids outside the tokenizer's vocabulary (size {vocab}).")
        n_text = text.count(self.spec.placeholder)
        n_ids = ids.count(self.spec.placeholder_id)
        if not n_text == n_ids == len(refs):
            raise BadRow(f"{where}: {len(refs)} image(s), {n_text} {self.spec.placeholder!r} in {MM_TEXT} and "
                         f"{n_ids} in input_ids; they must agree.")
        sizes = self._check_refs(refs, where)
        return self._finish(ids, labels, text, refs, sizes, where, src, index) | {"attention_mask": mask}
