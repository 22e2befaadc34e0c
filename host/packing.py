"""Sample packing: tokenized rows -> ``sequence_len`` bins, and the collator that batches them.

Rows are packed after the length policy (every row already fits ``sequence_len``) into bins by
first-fit decreasing, so each bin is one training row and the Trainer's (distributed) sampler deals
out whole bins: every rank gets whole bins and the same number of steps, with no sampler of ours.

A bin is the concatenation of its documents with ``position_ids`` restarting at 0 for each one and
the first label of each document set to -100 (its first token is never predicted from the previous
document). No attention mask is passed: transformers detects packed sequences from the
``position_ids`` and masks attention between documents itself (``masking_utils`` for ``sdpa``,
``eager`` and ``flex_attention``; varlen kernels for ``flash_attention_*``, which need the batch
flattened into a single row, see :func:`packed_collator`).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from host.errors import ConfigError, DataError

log = logging.getLogger("host.packing")

#: Columns a packed bin is built from; any other column cannot be concatenated across documents.
PACKABLE = ("input_ids", "labels", "attention_mask", "position_ids")


def _check_fits(lengths: list[int], capacity: int) -> None:
    """Both packers need every row to fit one bin."""
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        i = too_long[0]
        raise DataError(f"sample_packing: row {i} has {lengths[i]} tokens, more than sequence_len={capacity}.")


def first_fit_decreasing(lengths: list[int], capacity: int, seed: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of total length <= ``capacity``.

    Items go longest first (ties by index) into the first bin with room, found in O(log n) with a
    max segment tree over the bins' free space. The bins' order is then shuffled with ``seed``, so
    training does not see long documents first. Deterministic for a given input and seed.
    """
    _check_fits(lengths, capacity)
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    free = [0] * size + [capacity] * size  # leaves: free space per bin (unused bins are empty)
    for node in range(size - 1, 0, -1):
        free[node] = max(free[2 * node], free[2 * node + 1])
    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        if n == 0:
            continue
        node = 1
        while node < size:  # descend to the leftmost leaf with room
            node = 2 * node if free[2 * node] >= n else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        free[node] -= n
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    random.Random(seed).shuffle(bins)
    return bins


def next_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins in data order: a row starts a new bin when it does not fit the current
    one (axolotl's ``sample_packing_sequentially``; with ``curriculum_sampling`` training sees the rows in
    file order). Fewer rows per bin than first-fit decreasing, but no reordering."""
    _check_fits(lengths, capacity)
    bins: list[list[int]] = []
    room = 0
    for i, n in enumerate(lengths):
        if n == 0:
            continue
        if n > room:
            bins.append([])
            room = capacity
        bins[-1].append(i)
        room -= n
    return bins


@dataclass
class PackStats:
    rows: int
    bins: int
    tokens: int
    capacity: int

    @property
    def efficiency(self) -> float:
        """Non-pad fraction of the bins when each is padded to ``sequence_len``."""
        return self.tokens / max(self.bins * self.capacity, 1)

    def as_dict(self) -> dict:
        return {"rows": self.rows, "bins": self.bins, "tokens": self.tokens, "efficiency": round(self.efficiency, 4)}


def _gather(batch, source):
    """Concatenate each bin's rows (a batched ``datasets.map`` over bins of row indices)."""
    out = {"input_ids": [], "labels": [], "position_ids": []}
    for members in batch["members"]:
        rows = source[members]
        ids, labels, pos = [], [], []
        for doc_ids, doc_labels in zip(rows["input_ids"], rows["labels"]):
            ids.extend(doc_ids)
            labels.append(-100)
            labels.extend(doc_labels[1:])
            pos.extend(range(len(doc_ids)))
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["position_ids"].append(pos)
    return out


def pack(ds, cfg, split: str = "train"):
    """Return ``(bins dataset, PackStats)`` for tokenized rows ``ds`` (a ``datasets.Dataset``)."""
    import datasets

    if not hasattr(ds, "__len__"):
        raise ConfigError(
            "sample_packing: the dataset is streamed (an IterableDataset), which cannot be packed ahead of "
            "training; set sample_packing: false, or use a non-streaming dataset."
        )
    extra = [c for c in ds.column_names if c not in PACKABLE]
    if extra:
        raise ConfigError(
            f"sample_packing: {split} rows carry column(s) {extra}, which cannot be concatenated across "
            f"documents; set sample_packing: false for this dataset type."
        )
    lengths = [len(x) for x in ds["input_ids"]]
    sequential = bool(getattr(cfg, "sample_packing_sequentially", False))
    bins = next_fit(lengths, cfg.sequence_len) if sequential else first_fit_decreasing(lengths, cfg.sequence_len, cfg.seed)
    stats = PackStats(rows=len(lengths), bins=len(bins), tokens=sum(lengths), capacity=cfg.sequence_len)
    index = datasets.Dataset.from_dict({"members": bins})
    packed = index.map(
        _gather,
        batched=True,
        batch_size=256,
        fn_kwargs={"source": ds.select_columns(["input_ids", "labels"])},
        remove_columns=["members"],
        new_fingerprint=f"{ds._fingerprint}-packed-{cfg.sequence_len}-{'seq' if sequential else cfg.seed}",
        desc=f"pack {split}",
    )
    log.info(
        "sample_packing: %s: %d rows -> %d bins of sequence_len=%d, efficiency %.1f%% (non-pad fraction)",
        split, stats.rows, stats.bins, cfg.sequence_len, 100 * stats.efficiency,
    )
    return packed, stats


def prepare_model(model) -> None:
    """Turn the KV cache off (transformers detects packed documents only without a cache; training
    never uses one), and warn when the attention implementation has no transformers mask builder:
    transformers then passes no mask, and nothing would keep packed documents apart."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    model.config.use_cache = False

    impl = getattr(model.config, "_attn_implementation", None)
    if impl is not None and impl not in ALL_MASK_ATTENTION_FUNCTIONS:
        log.warning(
            "sample_packing: attn_implementation %r has no transformers mask builder, so packed documents may "
            "attend to each other; use sdpa, eager, flex_attention or flash_attention_2.", impl,
        )


def flattens(model) -> bool:
    """flash-attention kernels find packed documents only in a single flattened row (transformers
    reads ``cu_seqlens`` from ``position_ids`` only when the batch size is 1)."""
    impl = getattr(model.config, "_attn_implementation", None) or ""
    return "flash" in impl


def packed_collator(tokenizer, pad_to: int | None = None, flatten: bool = False):
    """Batch rows (packed bins or single documents) as ``input_ids``/``labels``/``position_ids``.

    No ``attention_mask``: padding is a segment of its own (positions restart at 0, labels -100),
    so the packed-sequence detection that isolates documents also keeps padding out. With
    ``flatten``, every row of the batch is concatenated into one row of batch size 1 (no padding).
    """
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def collate(rows):
        ids = [list(r["input_ids"]) for r in rows]
        labels = [list(r["labels"]) for r in rows]
        pos = [list(r["position_ids"]) if r.get("position_ids") is not None else list(range(len(x))) for r, x in zip(rows, ids)]
        if flatten:
            ids, pos = [sum(ids, [])], [sum(pos, [])]
            labels = [[-100, *x[1:]] for x in labels]  # a row's first token is never predicted from the row before
            labels = [sum(labels, [])]
        width = pad_to or max(len(x) for x in ids)
        for x, y, p in zip(ids, labels, pos):
            n = width - len(x)
            x.extend([pad_id] * n)
            y.extend([-100] * n)
            p.extend(range(n))
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(pos, dtype=torch.long),
        }

    return collate
