"""Turn ``datasets:`` entries into tokenized train/eval sets, cached by a content fingerprint.

Each entry is handled by the :class:`DatasetStrategy` its type's owner returns from the
``dataset_strategy`` hook. The host loads raw files (:func:`load_raw`), caches the concatenated
result under ``dataset_prepared_path/<fingerprint>``, and splits off ``val_set_size``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from host.errors import DataError

log = logging.getLogger("host.data")

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
_COMPLETE = "host_prepared.json"


@runtime_checkable
class DatasetStrategy(Protocol):
    """Turns one ``datasets:`` entry into rows with at least ``input_ids`` and ``labels``."""

    def fingerprint(self) -> dict[str, Any]:
        """Anything beyond the entry, its files, the tokenizer and ``sequence_len`` that changes
        the output (e.g. a processor's settings). JSON-serialisable."""

    def load(self) -> Any:
        """Return a ``datasets.Dataset`` (cached by the host) or ``datasets.IterableDataset``."""


#: Files above this size are fingerprinted by size, mtime and their first and last MiB, not read whole.
FULL_HASH_LIMIT = 256 << 20


def _hash_path(path: Path, h) -> None:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        st = f.stat()
        with open(f, "rb") as fh:
            if st.st_size <= FULL_HASH_LIMIT:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            else:
                h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
                h.update(fh.read(1 << 20))
                fh.seek(-(1 << 20), 2)
                h.update(fh.read())


def files_fingerprint(dataset_cfg) -> str:
    """Content hash of an entry's local files (the hub id itself for remote datasets)."""
    h = hashlib.sha256()
    path = Path(dataset_cfg.path)
    if path.exists():
        _hash_path(path, h)
        for extra in _as_list(dataset_cfg.data_files):
            p = path / extra if path.is_dir() else Path(extra)
            if p.exists():
                _hash_path(p, h)
    else:
        h.update(dataset_cfg.path.encode())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything in a tokenizer that changes token ids or templates."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    h.update(json.dumps({k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}).encode())
    return h.hexdigest()


def _as_list(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def load_raw(dataset_cfg, where: str):
    """Load an entry's raw rows with the ``datasets`` library, with errors that name the entry."""
    import datasets

    path = Path(dataset_cfg.path).expanduser()
    files = _as_list(dataset_cfg.data_files)
    try:
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
            ds = datasets.load_from_disk(str(path))
            return ds[dataset_cfg.split] if isinstance(ds, datasets.DatasetDict) else ds
        if path.is_file() or (path.is_dir() and files):
            targets = [str(path / f) for f in files] if path.is_dir() else [str(path)]
            builder = _builder_for(targets, where)
            return datasets.load_dataset(builder, data_files=targets, split="train")
        if path.is_dir():
            targets = sorted(str(p) for p in path.iterdir() if p.suffix in _BUILDERS)
            if not targets:
                raise DataError(f"{where}: directory {path} holds no .jsonl/.json/.parquet/.csv/.txt files.")
            return datasets.load_dataset(_builder_for(targets, where), data_files=targets, split="train")
        if path.suffix in _BUILDERS or path.is_absolute() or str(dataset_cfg.path).startswith("."):
            raise DataError(f"{where}: path {dataset_cfg.path!r} not found. Check the path (relative to the working directory).")
        return datasets.load_dataset(dataset_cfg.path, dataset_cfg.name, data_files=files or None, split=dataset_cfg.split)
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"{where}: {exc}") from None
    except Exception as exc:  # datasets raises many types for unreadable files
        raise DataError(f"{where}: cannot load {dataset_cfg.path!r}: {type(exc).__name__}: {exc}") from None


def _builder_for(targets: list[str], where: str) -> str:
    kinds = {_BUILDERS.get(Path(t).suffix) for t in targets}
    if None in kinds or len(kinds) != 1:
        raise DataError(
            f"{where}: cannot infer one file format from {targets}; use files of one kind "
            f"({', '.join(sorted(_BUILDERS))})."
        )
    return kinds.pop()


def require_columns(ds, columns: list[str], where: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{where}: missing column(s) {missing}; the file has {ds.column_names}. "
            f"Rename the column or set the entry's field key."
        )


def _strategies(cfg, pm, tokenizer, processor) -> list[tuple[Any, DatasetStrategy]]:
    out = []
    for i, entry in enumerate(cfg.datasets):
        strategy = pm.hook.dataset_strategy(cfg=cfg, dataset_cfg=entry, tokenizer=tokenizer, processor=processor)
        if strategy is None:
            raise DataError(f"datasets[{i}]: no enabled plugin builds dataset type {entry.type!r}.")
        out.append((entry, strategy))
    return out


def prepare(cfg, pm, tokenizer, processor=None):
    """Return ``(train, eval_or_None)``, loading from the prepared cache when it is current."""
    import datasets

    from host.plugins import plugin_versions

    if not cfg.datasets:
        raise DataError("datasets: no datasets configured; add at least one entry under `datasets:`.")
    strategies = _strategies(cfg, pm, tokenizer, processor)
    key = {
        "entries": [e.model_dump(mode="json") for e in cfg.datasets],
        "files": [files_fingerprint(e) for e in cfg.datasets],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "sequence_len": cfg.sequence_len,
        "excess_length_strategy": cfg.excess_length_strategy,
        "strategies": [s.fingerprint() for _, s in strategies],
        "plugins": plugin_versions(pm),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    cache = Path(cfg.dataset_prepared_path) / digest if cfg.dataset_prepared_path else None

    if cache is not None and (cache / _COMPLETE).exists():
        log.info("loading prepared dataset from %s", cache)
        full = datasets.load_from_disk(str(cache / "data"))
    else:
        parts = [s.load() for _, s in strategies]
        if any(isinstance(p, datasets.IterableDataset) for p in parts):
            if len(parts) != 1:
                raise DataError("datasets: a streaming dataset cannot be combined with other entries.")
            if cfg.val_set_size:
                raise DataError("val_set_size: cannot split an eval set from a streaming dataset; set it to 0.")
            return parts[0], None
        full = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        if len(full) == 0:
            raise DataError("datasets: no rows left after preparation; check the files and sequence_len.")
        if cache is not None:
            _save_atomically(full, cache, key)
    return split_eval(full, cfg)


def _save_atomically(ds, cache: Path, key: dict) -> None:
    """Write to a temp dir and rename, so a killed run never leaves a half-written cache."""
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    ds.save_to_disk(str(tmp / "data"))
    (tmp / _COMPLETE).write_text(json.dumps(key, indent=1, sort_keys=True, default=str))
    shutil.rmtree(cache, ignore_errors=True)
    tmp.rename(cache)
    log.info("saved prepared dataset to %s", cache)


def split_eval(full, cfg):
    if not cfg.val_set_size:
        return full, None
    size = cfg.val_set_size if cfg.val_set_size < 1 else int(cfg.val_set_size)
    if len(full) < 2:
        raise DataError(f"val_set_size: {len(full)} row(s) cannot be split into train and eval; add data or set val_set_size: 0.")
    parts = full.train_test_split(test_size=size, seed=cfg.seed, shuffle=True)
    return parts["train"], parts["test"]
