"""Token routing bookkeeping shared by every ScatterMoE kernel (public, stable API).

The kernels never move token rows into an expert-sorted copy. Instead they work from three index
tensors computed once per MoE layer call:

``sort_tokens(top_k_index: LongTensor[T, k], num_experts: int)
-> (sorted_expert_idxs, sorted_scattered_idxs, expert_offsets)``

* ``sorted_expert_idxs`` ``[T*k]`` int64: the expert id of every (token, slot) pair, ascending.
* ``sorted_scattered_idxs`` ``[T*k]`` int64: for sorted position ``p``, the flat index
  ``t * k + j`` of the (token ``t``, slot ``j``) pair it came from; the source token is
  ``sorted_scattered_idxs[p] // k``. The sort is stable, so ties keep token order.
* ``expert_offsets`` ``[E]`` int64: cumulative *end* offsets: expert ``e`` owns sorted positions
  ``[expert_offsets[e-1], expert_offsets[e])`` (with ``expert_offsets[-1] == 0`` for ``e == 0``).
  Experts that receive no token have an empty range.

Nothing here synchronises with the host (no ``.item()``, no ``bincount``), so it is safe inside
CUDA graphs and costs one sort (of int32 keys) plus one ``searchsorted`` (against a cached ``arange(E)``).
"""

from __future__ import annotations

import torch


def sort_tokens(top_k_index: torch.Tensor, num_experts: int):
    """Sort the ``T*k`` routing pairs by expert; see the module docstring for the three outputs."""
    if top_k_index.dim() != 2:
        raise ValueError(f"top_k_index must be [tokens, top_k], got shape {tuple(top_k_index.shape)}")
    # int32 keys: a radix sort of 32-bit keys is half the passes (and launches) of 64-bit ones
    flat = top_k_index.reshape(-1).to(torch.int32)
    sorted32, sorted_scattered_idxs = torch.sort(flat, stable=True)
    bounds = _expert_ids(num_experts, flat.device)
    expert_offsets = torch.searchsorted(sorted32, bounds, right=True)
    return sorted32.long(), sorted_scattered_idxs, expert_offsets


_IDS: dict = {}


def _expert_ids(num_experts: int, device: torch.device) -> torch.Tensor:
    """``arange(E)`` as int32 on ``device``, made once (one launch and one allocation less per layer call). Never cached
    while a CUDA graph is being captured: a tensor made there holds no values until the graph is replayed."""
    key = (num_experts, device)
    ids = _IDS.get(key)
    if ids is None:
        ids = torch.arange(num_experts, device=device, dtype=torch.int32)
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _IDS[key] = ids
    return ids


def expert_starts(expert_offsets: torch.Tensor) -> torch.Tensor:
    """Start offsets ``[E]`` from the cumulative end offsets."""
    return torch.cat([expert_offsets.new_zeros(1), expert_offsets[:-1]])
