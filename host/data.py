"""Turn ``datasets:`` entries into tokenized train/eval sets, cached by a content fingerprint.

Each entry is handled by the :class:`host.hookspecs.DatasetStrategy` its type's owner returns from
the ``dataset_strategy`` hook. The host loads raw files (:func:`load_raw`), checks every row a
strategy returns and applies ``sequence_len`` / ``excess_length_strategy`` to it
(:func:`finish_rows`, the same for every type, so no strategy can bypass them), caches the
concatenated result under ``dataset_prepared_path/<fingerprint>``, and splits off ``val_set_size``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from host import dedup
from host.errors import DataError
from host.hookspecs import DatasetStrategy  # noqa: F401  (re-exported: the contract lives in hookspecs)

log = logging.getLogger("host.data")

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
_COMPLETE = "host_prepared.json"


#: Files above this size are fingerprinted by size, mtime and their first and last MiB, not read whole.
FULL_HASH_LIMIT = 256 << 20


def _hash_path(path: Path, h) -> None:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    files = [f for f in files if f.is_file()]  # never open a FIFO or device: it may block forever
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
    path = Path(dataset_cfg.path).expanduser()
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


def load_raw(dataset_cfg, where: str, schema: dict | None = None, optional: dict | None = None):
    """Load an entry's raw rows with the ``datasets`` library, with errors that name the entry.

    Local files are loaded one by one, so a problem names its file and row (counted from 0).
    ``schema`` maps required columns, ``optional`` columns that may be absent, to a check of one
    value (``None`` when usable, else the problem): every row is checked before anything is
    tokenized. Special files (FIFOs, devices) and model directories are refused, never read.
    """
    import datasets

    path = Path(dataset_cfg.path).expanduser()
    checks = {**(optional or {}), **(schema or {})}
    try:
        check_special_files(dataset_cfg, where)
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
            ds = datasets.load_from_disk(str(path))
            ds = ds[dataset_cfg.split] if isinstance(ds, datasets.DatasetDict) else ds
            return _checked(ds, f"{where}: {path}", schema, checks)
        targets = local_targets(dataset_cfg, where)
        if targets is None:
            if path.suffix in _BUILDERS or path.is_absolute() or str(dataset_cfg.path).startswith("."):
                raise DataError(f"{where}: path {dataset_cfg.path!r} not found. Check the path (relative to the working directory).")
            files = _as_list(dataset_cfg.data_files)
            ds = datasets.load_dataset(dataset_cfg.path, dataset_cfg.name, data_files=files or None, split=dataset_cfg.split)
            return _checked(ds, where, schema, checks)
        builder = _builder_for([str(t) for t in targets], where)
        parts = []
        for target in targets:
            try:
                part = datasets.load_dataset(builder, data_files=[str(target)], split="train")
                parts.append(_checked(part, f"{where}: {target}", schema, checks))
            except DataError:
                raise
            except Exception as exc:  # datasets/Arrow raise many types for unreadable files (or rows)
                raise diagnose(target, builder, where, checks, exc) from None
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"{where}: {exc}") from None
    except Exception as exc:  # datasets raises many types for unreadable files
        raise DataError(f"{where}: cannot load {dataset_cfg.path!r}: {type(exc).__name__}: {exc}") from None


def local_targets(dataset_cfg, where: str) -> list[Path] | None:
    """The local files an entry names (``None`` for a hub dataset id)."""
    path = Path(dataset_cfg.path).expanduser()
    files = _as_list(dataset_cfg.data_files)
    if path.is_dir() and files:
        return [path / f for f in files]
    if path.is_dir():
        _refuse_model_dir(path, where)
        targets = sorted(p for p in path.iterdir() if p.suffix in _BUILDERS)
        if not targets:
            raise DataError(f"{where}: directory {path} holds no .jsonl/.json/.parquet/.csv/.txt files.")
        return targets
    if path.exists():
        return [path]
    return None


_MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "tokenizer.json", "tokenizer_config.json", "adapter_config.json")


def _refuse_model_dir(path: Path, where: str) -> None:
    found = [f for f in _MODEL_FILES if (path / f).exists()]
    if "config.json" in found or "adapter_config.json" in found or len(found) >= 2:
        raise DataError(
            f"{where}: {path} looks like a model directory ({', '.join(found)}), not a dataset. Point `path` at a "
            f"data file (.jsonl/.json/.parquet/.csv/.txt), a folder of them, or a dataset saved with save_to_disk."
        )


def check_special_files(dataset_cfg, where: str) -> None:
    """Refuse FIFOs, sockets and devices among an entry's paths: reading one would block or never end."""
    import stat

    path = Path(dataset_cfg.path).expanduser()
    candidates = [path] + ([path / f for f in _as_list(dataset_cfg.data_files)] if path.is_dir() else [])
    if path.is_dir():
        candidates += [p for p in path.iterdir() if p.suffix in _BUILDERS]
    for p in candidates:
        try:
            mode = p.stat().st_mode
        except OSError:
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode)
                    else "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
            raise DataError(f"{where}: {p} is {kind}, not a regular file; datasets must be regular files or folders of them.")


def _checked(ds, where: str, schema: dict | None, checks: dict):
    """Require ``schema``'s columns and check every row's values of ``checks``' columns."""
    if not checks:
        return ds
    require_columns(ds, list(schema or {}), where)
    present = [c for c in checks if c in ds.column_names]
    if not present:
        return ds
    start = 0
    for batch in ds.select_columns(present).iter(batch_size=1000):
        n = len(batch[present[0]])
        for j in range(n):
            for column in present:
                problem = checks[column](batch[column][j])
                if problem:
                    raise DataError(f"{where}: row {start + j}: field {column!r} {problem}.")
        start += n
    return ds


def diagnose(target: Path, builder: str, where: str, checks: dict, exc: Exception) -> DataError:
    """Why ``datasets`` could not load a file: the first row that is not UTF-8, not JSON, or breaks
    the schema (the library's own message names neither the row nor the field)."""
    if builder == "json":
        try:
            with open(target, "rb") as fh:
                data = fh.read(1 << 31)
        except OSError as err:
            return DataError(f"{where}: {target}: cannot read: {err.strerror}.")
        lines = data.split(b"\n") if target.suffix == ".jsonl" or not data.lstrip().startswith(b"[") else None
        if lines is not None:
            row = 0
            for n, raw in enumerate(lines, 1):
                if not raw.strip():
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    return DataError(f"{where}: {target}: row {row} (line {n}): bytes at column {err.start + 1} are not "
                                     f"UTF-8. Re-encode the file as UTF-8.")
                try:
                    value = json.loads(text)
                except ValueError as err:
                    return DataError(f"{where}: {target}: row {row} (line {n}): not valid JSON ({err}).")
                problem = _row_problem(value, checks)
                if problem:
                    return DataError(f"{where}: {target}: row {row} (line {n}): {problem}.")
                row += 1
        else:
            try:
                value = json.loads(data.decode("utf-8"))
            except UnicodeDecodeError as err:
                return DataError(f"{where}: {target}: bytes at offset {err.start} are not UTF-8. Re-encode the file as UTF-8.")
            except ValueError as err:
                return DataError(f"{where}: {target}: not valid JSON ({err}).")
            for i, item in enumerate(value if isinstance(value, list) else []):
                problem = _row_problem(item, checks)
                if problem:
                    return DataError(f"{where}: {target}: row {i}: {problem}.")
    return DataError(f"{where}: cannot load {target}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


def _row_problem(value, checks: dict) -> str | None:
    if not isinstance(value, dict):
        return f"is {type(value).__name__}, expected a JSON object per row"
    for column, check in checks.items():
        if column in value:
            problem = check(value[column])
            if problem:
                return f"field {column!r} {problem}"
    return None


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


def _strategies(cfg, pm, tokenizer, processor) -> list[tuple[Any, str, DatasetStrategy]]:
    from host.config import dataset_type_models

    owners = {name: owner for name, (owner, _) in dataset_type_models(pm).items()}
    out = []
    for i, entry in enumerate(cfg.datasets):
        strategy = pm.hook.dataset_strategy(cfg=cfg, dataset_cfg=entry, tokenizer=tokenizer, processor=processor)
        if strategy is None:
            raise DataError(f"datasets[{i}]: no enabled plugin builds dataset type {entry.type!r}.")
        out.append((entry, owners.get(entry.type, "?"), strategy))
    return out


def strategy_code_hash(strategy) -> str:
    """Hash of the source files of the package that defines ``strategy``'s class (or of its module
    file when it is a lone module), so editing a strategy's code invalidates its prepared cache."""
    import sys

    module = sys.modules.get(type(strategy).__module__)
    h = hashlib.sha256(type(strategy).__qualname__.encode())
    top = sys.modules.get(type(strategy).__module__.split(".")[0])
    root = getattr(top, "__path__", None)
    if root:
        files = sorted(p for d in root for p in Path(d).rglob("*.py"))
        base = Path(list(root)[0])
    else:
        origin = getattr(module, "__file__", None)
        files = [Path(origin)] if origin else []
        base = Path(origin).parent if origin else Path(".")
    for f in files:
        try:
            h.update(str(f.relative_to(base)).encode() + b"\0" + f.read_bytes())
        except (OSError, ValueError):
            h.update(str(f).encode())
    return h.hexdigest()


#: Per-token columns the host checks and truncates along with ``input_ids`` when a row has them.
TOKEN_COLUMNS = ("input_ids", "labels", "attention_mask", "position_ids", "token_type_ids")


class _RowRules:
    """The row contract of :class:`host.hookspecs.DatasetStrategy`, checked for every strategy."""

    def __init__(self, cfg, where: str, owner: str, kind: str, vocab: int | None):
        self.cfg, self.where, self.vocab = cfg, where, vocab
        self.source = f"{where}: dataset type {kind!r} (plugin {owner!r})"

    def fail(self, index: int | None, problem: str) -> DataError:
        row = f" row {index}:" if index is not None else ""
        return DataError(
            f"{self.source}:{row} {problem}. Every row needs input_ids (a non-empty list of token ids) and "
            f"labels (a list of ints of the same length, -100 where no loss is taken); see README 'Writing a dataset type'."
        )

    def check(self, row: dict, index: int) -> None:
        for key in ("input_ids", "labels"):
            if key not in row:
                raise self.fail(index, f"no {key!r} (the row has {sorted(row)})")
        n = None
        for key in TOKEN_COLUMNS:
            if key not in row:
                continue
            value = row[key]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise self.fail(index, f"{key!r} must be a list of ints, got {_short(value)}")
            if n is None:
                n = len(value)
                if n == 0:
                    raise self.fail(index, "'input_ids' is empty")
            elif len(value) != n:
                raise self.fail(index, f"{key!r} has {len(value)} entries but input_ids has {n}; they must be equal")
        if self.vocab is not None:
            bad = next((t for t in row["input_ids"] if not 0 <= t < self.vocab), None)
            if bad is not None:
                raise self.fail(index, f"input_ids holds {bad}, outside the tokenizer's vocabulary [0, {self.vocab})")
            bad = next((t for t in row["labels"] if t != -100 and not 0 <= t < self.vocab), None)
            if bad is not None:
                raise self.fail(index, f"labels holds {bad}: a label is -100 or a token id in [0, {self.vocab})")
        mask = row.get("attention_mask")
        if mask is not None and any(m not in (0, 1) for m in mask):
            raise self.fail(index, "attention_mask may hold only 0 and 1")

    def too_long(self, index: int, n: int) -> DataError:
        seq = self.cfg.sequence_len
        return DataError(
            f"{self.where}: row {index} has {n} tokens, more than sequence_len={seq}. Raise sequence_len, or set "
            f"excess_length_strategy: drop or truncate."
        )


def _short(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _truncate(row: dict, seq: int) -> dict:
    return {k: row[k][:seq] for k in TOKEN_COLUMNS if k in row}


def finish_rows(ds, cfg, where: str, owner: str, kind: str, tokenizer=None):
    """Check a strategy's rows against the row contract and apply the length policy.

    Map-style datasets are checked in full here (errors name the first bad row); streamed ones
    row by row as they are read.
    """
    import datasets

    vocab = len(tokenizer) if tokenizer is not None else None
    rules = _RowRules(cfg, where, owner, kind, vocab)
    seq, policy = cfg.sequence_len, cfg.excess_length_strategy
    if not isinstance(ds, (datasets.Dataset, datasets.IterableDataset)):
        raise rules.fail(None, f"load() returned a {type(ds).__name__}, not a datasets.Dataset or IterableDataset")
    if isinstance(ds, datasets.IterableDataset):
        def enforce(row, index):
            rules.check(row, index)
            n = len(row["input_ids"])
            if n > seq and policy == "raise":
                raise rules.too_long(index, n)
            return _truncate(row, seq) if n > seq and policy == "truncate" else {}

        out = ds.map(enforce, with_indices=True)
        if policy == "drop":
            out = out.filter(lambda row: len(row["input_ids"]) <= seq)
        return out.filter(lambda row: any(t != -100 for t in row["labels"]))

    columns = set(ds.column_names)
    missing = [k for k in ("input_ids", "labels") if k not in columns]
    if missing:
        raise rules.fail(None, f"the rows have no {missing} column(s) (columns: {sorted(columns)})")
    lengths = _check_all(ds, rules)
    too_long = [i for i, n in enumerate(lengths) if n > seq]
    if too_long and policy == "raise":
        raise rules.too_long(too_long[0], lengths[too_long[0]])
    if too_long and policy == "truncate":
        ds = ds.map(lambda r: _truncate(r, seq), desc="truncate")
        log.warning("%s: truncated %d row(s) to sequence_len=%d", where, len(too_long), seq)
    elif too_long:
        keep = sorted(set(range(len(lengths))) - set(too_long))
        ds = ds.select(keep)
        log.warning("%s: dropped %d row(s) longer than sequence_len=%d", where, len(too_long), seq)
    trained = _rows_with_labels(ds) if len(ds) else []
    if trained and not all(trained) and any(trained):
        ds = ds.select([i for i, t in enumerate(trained) if t])
        log.warning("%s: dropped %d row(s) whose labels are all -100 (nothing to learn, e.g. a prompt without "
                    "a response)", where, trained.count(False))
    if len(ds) == 0 or not any(trained):
        raise DataError(
            f"{where}: no trainable rows left after dropping {len(too_long)} row(s) longer than sequence_len={seq} "
            f"(or no row has a label other than -100, e.g. no assistant turns). Raise sequence_len or set "
            f"excess_length_strategy: truncate."
        )
    return ds


def _check_all(ds, rules: _RowRules) -> list[int]:
    """Vectorised checks over Arrow columns; the slow per-row check only finds the bad row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = ds.with_format("arrow")[:]
    present = [k for k in TOKEN_COLUMNS if k in table.column_names]
    lengths = None
    ok = True
    for key in present:
        col = table.column(key)
        t = col.type
        if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) or not pa.types.is_integer(t.value_type):
            ok = False
            break
        if col.null_count or pc.sum(pc.list_value_length(col).is_null()).as_py():
            ok = False
            break
        n = pc.list_value_length(col)
        if lengths is None:
            lengths = n
            if pc.min(n).as_py() == 0:
                ok = False
                break
        elif not pc.all(pc.equal(n, lengths)).as_py():
            ok = False
            break
        flat = pc.list_flatten(col)
        if len(flat) == 0:
            continue
        lo, hi = pc.min(flat).as_py(), pc.max(flat).as_py()
        if key == "input_ids" and rules.vocab is not None and (lo < 0 or hi >= rules.vocab):
            ok = False
        elif key == "labels" and rules.vocab is not None and (hi >= rules.vocab or (lo < 0 and pc.any(pc.and_(pc.less(flat, 0), pc.not_equal(flat, -100))).as_py())):
            ok = False
        elif key == "attention_mask" and (lo < 0 or hi > 1):
            ok = False
        if not ok:
            break
    if not ok:
        for i, row in enumerate(ds.select_columns(present)):
            rules.check(row, i)
        raise rules.fail(None, "the token columns break the row contract")  # pragma: no cover - check finds it
    return lengths.to_pylist()


def _rows_with_labels(ds) -> list[bool]:
    """Per row: does any label differ from -100?"""
    import numpy as np
    import pyarrow.compute as pc

    col = ds.with_format("arrow")[:].column("labels").combine_chunks()
    hit = pc.filter(pc.list_parent_indices(col), pc.not_equal(pc.list_flatten(col), -100))
    mask = np.zeros(len(ds), dtype=bool)
    mask[hit.to_numpy()] = True
    return mask.tolist()


def _stream_problems(n_parts: int, cfg) -> list[str]:
    """What a streamed dataset cannot do with this config, all reported at once (a stream is known only
    once a strategy's ``load()`` returns it, so this cannot run at config validation)."""
    checks = (
        (n_parts != 1, "datasets: a streaming dataset cannot be combined with other entries."),
        (bool(cfg.val_set_size), "val_set_size: cannot split an eval set from a streaming dataset; set it to 0."),
        (bool(cfg.dataset_exact_deduplication), dedup.STREAM_REFUSAL),
    )
    return [message for bad, message in checks if bad]


def prepare(cfg, pm, tokenizer, processor=None):
    """Return ``(train, eval_or_None)``, loading from the prepared cache when it is current."""
    import datasets

    from host.plugins import plugin_versions

    if not cfg.datasets:
        raise DataError("datasets: no datasets configured; add at least one entry under `datasets:`.")
    for i, entry in enumerate(cfg.datasets):  # before fingerprinting reads any file
        check_special_files(entry, f"datasets[{i}] ({entry.path})")
    strategies = _strategies(cfg, pm, tokenizer, processor)
    key = {
        "entries": [e.model_dump(mode="json") for e in cfg.datasets],
        "files": [files_fingerprint(e) for e in cfg.datasets],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "sequence_len": cfg.sequence_len,
        "excess_length_strategy": cfg.excess_length_strategy,
        "dataset_exact_deduplication": bool(cfg.dataset_exact_deduplication),
        "strategies": [s.fingerprint() for _, _, s in strategies],
        "strategy_code": [strategy_code_hash(s) for _, _, s in strategies],
        "plugins": plugin_versions(pm),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    cache = Path(cfg.dataset_prepared_path) / digest if cfg.dataset_prepared_path else None
    if cache is not None:
        clean_stale_temp_dirs(cache.parent)

    if cache is not None and (cache / _COMPLETE).exists():
        log.info("loading prepared dataset from %s", cache)
        full = datasets.load_from_disk(str(cache / "data"))
    else:
        parts = []
        for i, (entry, owner, strategy) in enumerate(strategies):
            where = f"datasets[{i}] ({entry.path})"
            parts.append(finish_rows(strategy.load(), cfg, where, owner, entry.type, tokenizer))
        if any(isinstance(p, datasets.IterableDataset) for p in parts):
            problems = _stream_problems(len(parts), cfg)
            if problems:
                raise DataError("\n".join(problems))
            return parts[0], None
        full = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        if cfg.dataset_exact_deduplication:  # before the split: no row repeats within or across train/eval
            full = dedup.deduplicate(full)
        if len(full) == 0:
            raise DataError("datasets: no rows left after preparation; check the files and sequence_len.")
        if cache is not None:
            _save_atomically(full, cache, key)
    return split_eval(full, cfg)


def clean_stale_temp_dirs(root: Path) -> None:
    """Remove ``<digest>.tmp<pid>`` dirs left by a preprocess killed while saving (its pid is gone)."""
    if not root.is_dir():
        return
    for tmp in root.glob("*.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[-1]
        if not tmp.is_dir() or not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("removed %s, left by an interrupted run", tmp)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    parts = full.train_test_split(test_size=size, seed=cfg.seed, shuffle=not cfg.curriculum_sampling)  # curriculum: keep order
    return parts["train"], parts["test"]
