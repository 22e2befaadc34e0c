"""The streaming route: a resumable raw-row source, the tokenized-stream cache, and the stream.

A resumed run (``ignore_data_skip: true``) starts the stream at the number of samples the
checkpoint had consumed. With ``dataset_prepared_path`` those rows are found by seeking in the
cache (shards of fixed row count), so the cost does not grow with the resume step, and the raw
source continues from the byte offset recorded after the last cached row: no text is re-tokenized
and no image is re-opened, re-decoded or re-processed for samples already trained on.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

from host.errors import DataError

from host_plugin_mmcpt import encode as enc
from host_plugin_mmcpt import images as img_mod

log = logging.getLogger("host.mmcpt")

_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
STATE_CALLBACK = "MMCPTStreamState"


# --- raw sources ----------------------------------------------------------------------------


def _files_of(entry, where: str) -> list[str] | None:
    """Local files an entry names (a file, a directory, or a glob); None for a hub dataset id."""
    path = os.path.expanduser(entry.path)
    extra = [entry.data_files] if isinstance(entry.data_files, str) else list(entry.data_files or [])
    if any(ch in path for ch in "*?["):
        files = sorted(glob.glob(path))
        if not files:
            raise DataError(f"{where}: pattern {entry.path!r} matches no files.")
    elif os.path.isdir(path):
        files = [os.path.join(path, f) for f in extra] if extra else sorted(
            os.path.join(path, f) for f in os.listdir(path) if Path(f).suffix in _KINDS)
        if not files:
            raise DataError(f"{where}: directory {entry.path!r} holds no .jsonl/.json/.parquet/.csv files.")
    elif os.path.isfile(path):
        files = [path]
    elif path.startswith((".", "/", "~")) or Path(path).suffix in _KINDS:
        raise DataError(f"{where}: path {entry.path!r} not found. Check the path (relative to the working directory).")
    else:
        return None
    return [os.path.abspath(f) for f in files]


class JsonlSource:
    """JSON-lines files read line by line; the position is (file, byte offset, line), so resuming
    seeks straight to it."""

    def __init__(self, files: list[str], where: str):
        self.files, self.where = files, where

    def key(self) -> list:
        out = []
        for f in self.files:
            st = os.stat(f)
            out.append([f, st.st_size, st.st_mtime_ns])
        return out

    @staticmethod
    def start_state() -> dict:
        return {"file": 0, "offset": 0, "line": 0}

    def iterate(self, state: dict) -> Iterator[tuple[dict, str, int, dict]]:
        for fi in range(state["file"], len(self.files)):
            name = self.files[fi]
            offset, line_no = (state["offset"], state["line"]) if fi == state["file"] else (0, 0)
            with open(name, "rb") as fh:
                fh.seek(offset)
                while True:
                    line = fh.readline()
                    if not line:
                        break
                    offset += len(line)
                    index, line_no = line_no, line_no + 1
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise enc.BadRow(f"{name}: row {index}: invalid JSON ({exc}).") from None
                    if not isinstance(row, dict):
                        raise enc.BadRow(f"{name}: row {index}: a row must be a JSON object.")
                    yield row, name, index, {"file": fi, "offset": offset, "line": line_no}


class DatasetsSource:
    """Anything else (parquet, csv, JSON arrays, hub ids) through ``datasets`` streaming; resuming
    skips raw rows by count (text only: images are never touched)."""

    def __init__(self, entry, files: list[str] | None, where: str):
        self.entry, self.files, self.where = entry, files, where

    def key(self) -> list:
        return JsonlSource(self.files, self.where).key() if self.files else [self.entry.path, self.entry.name]

    @staticmethod
    def start_state() -> dict:
        return {"rows": 0}

    def iterate(self, state: dict):
        import datasets

        try:
            if self.files:
                kinds = {_KINDS.get(Path(f).suffix) for f in self.files}
                if None in kinds or len(kinds) != 1:
                    raise DataError(f"{self.where}: use files of one kind (.jsonl, .json, .parquet, .csv).")
                ds = datasets.load_dataset(kinds.pop(), data_files=self.files, split="train", streaming=True)
            else:
                ds = datasets.load_dataset(self.entry.path, self.entry.name, split=self.entry.split, streaming=True)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{self.where}: cannot stream {self.entry.path!r}: {type(exc).__name__}: {exc}") from None
        done = state["rows"]
        if done:
            ds = ds.skip(done)
        for k, row in enumerate(ds):
            yield row, self.entry.path, done + k, {"rows": done + k + 1}


def make_source(entry, where: str):
    files = _files_of(entry, where)
    if files and all(f.endswith(".jsonl") or (f.endswith(".json") and _is_json_lines(f)) for f in files):
        return JsonlSource(files, where)
    return DatasetsSource(entry, files, where)


def _is_json_lines(path: str) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()
    return not head.startswith(b"[")


# --- the cache ------------------------------------------------------------------------------


class StreamCache:
    """Tokenized rows as JSON lines in shards of ``shard_rows``; ``meta.json`` says how many rows
    are committed, where the raw source stands after the last one, and whether the stream ended.
    Rows past the committed count (a killed run) are cut off when the cache is reopened."""

    SHARD_ROWS = 1000
    COMMIT_EVERY = 64

    def __init__(self, root: str | Path, key: dict, start_state: dict):
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.dir = Path(root) / f"mmcpt-stream-{digest}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.writable = int(os.environ.get("RANK", "0")) == 0 and self._lock()
        meta_path = self.dir / "meta.json"
        if meta_path.exists():
            self.meta = json.loads(meta_path.read_text())
        else:
            self.meta = {"rows": 0, "dropped": 0, "complete": False, "source": start_state, "tail_bytes": 0,
                         "shard_rows": self.SHARD_ROWS, "key": key}
        self.shard_rows = int(self.meta["shard_rows"])
        self._fh = None
        self._since_commit = 0
        if self.writable:
            self._trim_tail()
            if not meta_path.exists():
                self.commit()
        ACTIVE.append(self)

    def _lock(self) -> bool:
        try:
            import fcntl
        except ImportError:  # not POSIX: single writer assumed
            return True
        self._lockfh = open(self.dir / ".lock", "w")  # noqa: SIM115 (held for the process lifetime)
        try:
            fcntl.flock(self._lockfh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            log.warning("mmcpt: stream cache %s is in use by another process; reading it without writing", self.dir)
            return False

    @property
    def rows(self) -> int:
        return int(self.meta["rows"])

    def _shard(self, index: int) -> Path:
        return self.dir / f"rows-{index // self.shard_rows:06d}.jsonl"

    def _trim_tail(self) -> None:
        rows = self.rows
        tail = self._shard(rows)
        if rows % self.shard_rows == 0:
            tail.unlink(missing_ok=True)
        elif tail.exists() and tail.stat().st_size != self.meta["tail_bytes"]:
            with open(tail, "r+b") as fh:
                fh.truncate(self.meta["tail_bytes"])
        nxt = self.dir / f"rows-{rows // self.shard_rows + 1:06d}.jsonl"
        nxt.unlink(missing_ok=True)

    def read(self, start: int) -> Iterator[dict]:
        """Committed rows from ``start``: seek to its shard, skip < shard_rows lines."""
        self.flush()
        n = start
        end = self.rows
        while n < end:
            with open(self._shard(n), "rb") as fh:
                for _ in range(n % self.shard_rows):
                    fh.readline()
                while n < end:
                    line = fh.readline()
                    if not line:
                        break
                    yield json.loads(line)
                    n += 1
                    if n % self.shard_rows == 0:
                        break

    def append(self, row: dict, source_state: dict, dropped: int) -> None:
        if not self.writable:
            return
        if self._fh is None or self.rows % self.shard_rows == 0:
            if self._fh is not None:
                self._fh.close()
            self._fh = open(self._shard(self.rows), "ab")  # noqa: SIM115
        self._fh.write((json.dumps(row, separators=(",", ":")) + "\n").encode())
        self.meta["rows"] += 1
        self.meta["tail_bytes"] = self._fh.tell()
        self.meta["source"] = source_state
        self.meta["dropped"] = dropped
        self._since_commit += 1
        if self._since_commit >= self.COMMIT_EVERY:
            self.commit()

    def advance(self, source_state: dict, dropped: int) -> None:
        """Record source progress past dropped rows (no row appended)."""
        if self.writable:
            self.meta["source"], self.meta["dropped"] = source_state, dropped

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()

    def commit(self, complete: bool | None = None) -> None:
        if not self.writable:
            return
        if complete is not None:
            self.meta["complete"] = complete
        self.flush()
        if self._fh is not None:
            os.fsync(self._fh.fileno())
        tmp = self.dir / "meta.json.tmp"
        tmp.write_text(json.dumps(self.meta, sort_keys=True, default=str))
        os.replace(tmp, self.dir / "meta.json")
        self._since_commit = 0

    def close(self) -> None:
        self.commit()
        if self._fh is not None:
            self._fh.close()
            self._fh = None


#: Caches opened in this process; the trainer callback commits them when a checkpoint is saved.
ACTIVE: list[StreamCache] = []


def commit_all() -> None:
    for cache in ACTIVE:
        cache.commit()


# --- resume position ------------------------------------------------------------------------


def resume_position(cfg) -> int:
    """Samples the checkpoint being resumed had consumed (0 for a fresh run, or when the Trainer
    itself fast-forwards because ignore_data_skip is off)."""
    from host.checkpoints import resolve_resume

    if not cfg.ignore_data_skip:
        return 0
    ckpt = resolve_resume(cfg)
    if ckpt is None:
        return 0
    state_file = Path(ckpt) / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"resume_from_checkpoint: cannot read {state_file}: {exc}") from None
    saved = (state.get("stateful_callbacks") or {}).get(STATE_CALLBACK)
    if isinstance(saved, list):
        saved = saved[0] if saved else None
    if saved:
        return int(saved["args"]["samples_consumed"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    n = int(state.get("global_step", 0)) * cfg.micro_batch_size * cfg.gradient_accumulation_steps * world
    log.warning("mmcpt: %s has no stream position; assuming %d samples consumed from global_step", ckpt, n)
    return n


# --- the stream -----------------------------------------------------------------------------


class MMStream:
    """Yields prepared rows: cached ones first, then newly encoded ones (appended to the cache)."""

    def __init__(self, encoder: enc.RowEncoder, source, cache: StreamCache | None, start: int, skip_bad: bool,
                 where: str):
        self.encoder, self.source, self.cache, self.start = encoder, source, cache, start
        self.skip_bad, self.where = skip_bad, where
        self.iterations = 0
        self.stats = {"cached_rows_read": 0, "rows_encoded": 0, "rows_skipped_by_encoding": 0, "dropped": 0}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        start = self.start if self.iterations == 0 else 0
        self.iterations += 1
        cache = self.cache
        to_skip = 0
        if cache is not None and cache.meta["complete"] and cache.rows:
            start %= cache.rows
        if cache is not None and start <= cache.rows:
            for row in cache.read(start):
                self.stats["cached_rows_read"] += 1
                yield row
            if cache.meta["complete"]:
                return
            state, dropped = cache.meta["source"], int(cache.meta["dropped"])
        elif cache is not None:
            state, dropped = cache.meta["source"], int(cache.meta["dropped"])
            to_skip = start - cache.rows
        else:
            state, dropped, to_skip = self.source.start_state(), 0, start
        if to_skip:
            log.info("mmcpt: re-encoding %d row(s) of text to reach the resume position (no images are decoded)",
                     to_skip)
        try:
            for raw, name, index, after in self.source.iterate(state):
                try:
                    row = self.encoder.encode(raw, index, name)
                except (enc.BadRow, img_mod.BadImage) as exc:
                    if not self.skip_bad:
                        raise enc.BadRow(str(exc)) from None
                    dropped += 1
                    self.stats["dropped"] += 1
                    if dropped <= 3:
                        log.warning("mmcpt: dropped bad row (skip_bad_rows): %s", exc)
                    if cache is not None:
                        cache.advance(after, dropped)
                    continue
                if cache is not None:
                    cache.append(row, after, dropped)
                if to_skip:
                    to_skip -= 1
                    self.stats["rows_skipped_by_encoding"] += 1
                    continue
                self.stats["rows_encoded"] += 1
                yield row
            if cache is not None:
                cache.commit(complete=True)
        finally:
            if cache is not None:
                cache.commit()


_STREAMS: dict[str, MMStream] = {}


def _generate(key: str):
    yield from _STREAMS[key]


def as_iterable_dataset(stream: MMStream):
    """Wrap the stream in a ``datasets.IterableDataset`` (what the host treats as streaming)."""
    import datasets

    key = f"{id(stream)}"
    _STREAMS[key] = stream
    return datasets.IterableDataset.from_generator(_generate, gen_kwargs={"key": key})
