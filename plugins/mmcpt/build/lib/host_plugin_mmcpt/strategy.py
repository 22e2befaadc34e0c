"""Dataset strategies: non-streaming (raw or pre-tokenized rows) and streaming."""

from __future__ import annotations

import logging
from typing import Any

from host.data import load_raw
from host.errors import DataError

from host_plugin_mmcpt import encode as enc
from host_plugin_mmcpt import images as img_mod

log = logging.getLogger("host.mmcpt")

VERSION = 1


def where_of(cfg, entry) -> str:
    try:
        return f"datasets[{cfg.datasets.index(entry)}] ({entry.path})"
    except ValueError:
        return f"pretraining_dataset[0] ({entry.path})"


def skip_bad(cfg, entry) -> bool:
    return cfg.skip_bad_rows if entry.skip_bad_rows is None else entry.skip_bad_rows


class _Base:
    def __init__(self, cfg, entry, tokenizer, processor):
        enc.check_tokenizer(tokenizer, processor)
        self.cfg, self.entry, self.tokenizer, self.processor = cfg, entry, tokenizer, processor
        self.spec = enc.ImageTokenSpec.from_processor(processor)
        self.where = where_of(cfg, entry)
        self.skip_bad = skip_bad(cfg, entry)

    def fingerprint(self) -> dict[str, Any]:
        base = img_mod.resolve_base(self.entry.image_base_dir, self.where) if self.entry.image_base_dir else None
        return {
            "mmcpt": VERSION,
            "route": type(self).__name__,
            "processor": enc.processor_fingerprint(self.processor, self.spec),
            "image_base_dir": base,
            "image_token": self.entry.image_token or self.spec.placeholder,
            "skip_bad_rows": self.skip_bad,
            "skip_prepare_dataset": self.cfg.skip_prepare_dataset,
        }

    def encoder(self) -> enc.RowEncoder:
        base = img_mod.resolve_base(self.entry.image_base_dir, self.where)
        return enc.RowEncoder(self.cfg, self.entry, self.tokenizer, self.spec, base, self.cfg.remote_image_timeout)


class MapStrategy(_Base):
    """``datasets:`` route: tokenize once (or validate pre-tokenized rows); the host caches the result."""

    def load(self):
        raw = load_raw(self.entry, self.where)
        encoder = self.encoder()
        pretok = self.cfg.skip_prepare_dataset
        fn = encoder.validate_pretokenized if pretok else encoder.encode
        if pretok:
            needed = ["input_ids", "attention_mask", "labels"]
            text_ok = enc.MM_TEXT in raw.column_names or self.entry.text_column in raw.column_names
            missing = [c for c in needed if c not in raw.column_names] + ([] if text_ok else [enc.MM_TEXT])
        else:
            missing = [c for c in (self.entry.text_column,) if c not in raw.column_names]
        if missing:
            raise DataError(
                f"{self.where}: missing column(s) {missing}; the file has {raw.column_names}. "
                + ("Pre-tokenized rows need _mm_text, images, input_ids, attention_mask and labels."
                   if pretok else "Set text_column to the column holding the text.")
            )
        bad: list[str] = []
        skip = self.skip_bad

        def one(row, idx):
            try:
                return fn(row, idx, self.where) | {"_mm_bad": ""}
            except enc.BadRow as exc:
                if not skip:
                    raise
                bad.append(str(exc))
                return _empty_row(self.where, idx, str(exc))
            except img_mod.BadImage as exc:
                if not skip:
                    raise enc.BadRow(str(exc)) from None
                bad.append(str(exc))
                return _empty_row(self.where, idx, str(exc))

        import hashlib
        import json

        tag = json.dumps([self.entry.model_dump(mode="json"), pretok, VERSION, skip], sort_keys=True)
        out = raw.map(one, with_indices=True, remove_columns=raw.column_names, features=features(),
                      new_fingerprint=hashlib.sha256(tag.encode()).hexdigest()[:16],
                      desc="mmcpt validate" if pretok else "mmcpt tokenize", load_from_cache_file=False)
        if skip:
            reasons = [r for r in out["_mm_bad"] if r]
            if reasons:
                log.warning("%s: dropped %d bad row(s) (skip_bad_rows); first: %s", self.where, len(reasons), reasons[0])
                out = out.filter(lambda r: not r, input_columns="_mm_bad", load_from_cache_file=False)
        out = out.remove_columns("_mm_bad")
        if len(out) == 0:
            raise DataError(f"{self.where}: no rows left after dropping bad rows; see the warnings above.")
        log.info("%s: %d multimodal rows prepared (%d with images)", self.where, len(out),
                 sum(1 for x in out[enc.IMAGES] if x))
        return out


def features():
    import datasets

    ints = datasets.Sequence(datasets.Value("int64"))
    return datasets.Features({
        "input_ids": ints, "attention_mask": ints, "labels": ints,
        enc.MM_TEXT: datasets.Value("string"), enc.IMAGES: datasets.Sequence(datasets.Value("string")),
        enc.BASE: datasets.Value("string"), enc.REMOTE: datasets.Value("bool"), enc.SRC: datasets.Value("string"),
        enc.ROW: datasets.Value("int64"), "_mm_bad": datasets.Value("string"),
    })


def _empty_row(src: str, idx: int, reason: str) -> dict[str, Any]:
    return {"input_ids": [0], "attention_mask": [1], "labels": [-100], enc.MM_TEXT: "", enc.IMAGES: [],
            enc.BASE: "", enc.REMOTE: False, enc.SRC: src, enc.ROW: idx, "_mm_bad": reason}


class StreamStrategy(_Base):
    """``pretraining_dataset`` + ``streaming: true``: an iterable dataset (the host does not cache
    it); with ``dataset_prepared_path`` the tokenized stream is cached by this plugin."""

    def __init__(self, cfg, entry, tokenizer, processor):
        super().__init__(cfg, entry, tokenizer, processor)
        self.where = f"pretraining_dataset[0] ({entry.path})"
        self.stream = None

    def cache_key(self, source) -> dict[str, Any]:
        from importlib.metadata import PackageNotFoundError, version

        try:
            plugin_version = version("host-plugin-mmcpt")
        except PackageNotFoundError:
            plugin_version = "?"
        return {
            "entry": self.entry.model_dump(mode="json"),
            "source": source.key(),
            "strategy": self.fingerprint(),
            "sequence_len": self.cfg.sequence_len,
            "plugin_version": plugin_version,
        }

    def load(self):
        from host_plugin_mmcpt import stream as st

        source = st.make_source(self.entry, self.where)
        cache = None
        if self.cfg.dataset_prepared_path:
            cache = st.StreamCache(self.cfg.dataset_prepared_path, self.cache_key(source), source.start_state())
            log.info("mmcpt: stream cache %s (%d rows%s)", cache.dir, cache.rows,
                     ", complete" if cache.meta["complete"] else "")
        start = st.resume_position(self.cfg)
        if start:
            log.info("mmcpt: resuming the stream at sample %d (ignore_data_skip)", start)
        RUNS[id(self.cfg)] = {"start": start}
        self.stream = st.MMStream(self.encoder(), source, cache, start, self.skip_bad, self.where)
        return st.as_iterable_dataset(self.stream)


#: Per-run facts the trainer callback needs (keyed by id of the run's config).
RUNS: dict[int, dict[str, Any]] = {}
