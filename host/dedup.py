"""``dataset_exact_deduplication``: drop rows that are exact copies of an earlier row (axolotl's meaning).

Runs on the prepared rows (every column, after tokenization and the length policy) of all entries
together, before ``val_set_size`` splits off the eval set, so no row is repeated within train, within
eval, or between them. The first copy is kept, in order. The result is what the prepared-data cache
stores (the key says whether deduplication was on).
"""

from __future__ import annotations

import hashlib
import json
import logging

from host.errors import DataError

log = logging.getLogger("host.data")


class _Unhashable(Exception):
    pass


def _encode(value):
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": hashlib.sha256(value).hexdigest()}
    if hasattr(value, "tolist"):  # numpy arrays / scalars
        return value.tolist()
    raise _Unhashable(type(value).__name__)


def row_digest(row: dict) -> bytes:
    """A digest of a row's full content (column names and values)."""
    return hashlib.sha256(json.dumps(row, sort_keys=True, default=_encode).encode()).digest()


STREAM_REFUSAL = (
    "dataset_exact_deduplication: a streaming dataset cannot be deduplicated (its rows are read once, "
    "as training consumes them); set dataset_exact_deduplication: false or load the data without streaming."
)


def deduplicate(ds, where: str = "datasets"):
    """``ds`` without exact duplicate rows (first copy kept); logs how many were dropped.

    A row holding values with no stable content encoding (decoded images) leaves the dataset as it is,
    with one warning, as in axolotl.
    """
    import datasets

    if isinstance(ds, datasets.IterableDataset):
        raise DataError(STREAM_REFUSAL)
    seen: set[bytes] = set()
    keep: list[int] = []
    try:
        for i, row in enumerate(ds):
            digest = row_digest(row)
            if digest not in seen:
                seen.add(digest)
                keep.append(i)
    except _Unhashable as exc:
        log.warning("dataset_exact_deduplication: skipped; rows hold %s values, which have no stable content "
                    "to compare (images). Deduplicate the source files instead.", exc)
        return ds
    dropped = len(ds) - len(keep)
    log.info("dataset_exact_deduplication: dropped %d of %d %s row(s) that repeat an earlier row exactly",
                dropped, len(ds), where)
    return ds.select(keep) if dropped else ds
