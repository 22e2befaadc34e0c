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

Ids are compared as int32 (``top_k_index.to(torch.int32)``). Ids ``>= E`` (expert-parallel sentinels) sort after
every expert, outside every expert's range; negative ids sort first and fall inside expert 0's range.

On CUDA (and under ``TRITON_INTERPRET=1``) this is a Triton counting sort (``routing_kernels``: one to three
launches, deterministic, equal to the torch path bit for bit, except that several *distinct* out-of-range values on
one side keep their (token, slot) order there instead of being ordered by value); elsewhere, or with
``SCATTERMOE_TRITON_ROUTING=0`` (``TRITON``), one stable ``torch.sort`` of int32 keys plus one ``searchsorted``
(against a cached ``arange(E)``). Nothing here synchronises with the host (no ``.item()``, no ``bincount``), so both
are safe inside CUDA graphs.
"""

from __future__ import annotations

import os

import torch

#: the Triton counting sort on CUDA / under the interpreter (``SCATTERMOE_TRITON_ROUTING=0``: always the torch path)
TRITON = os.environ.get("SCATTERMOE_TRITON_ROUTING", "1") == "1"
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_RK = None  # routing_kernels, imported on first use


def sort_tokens(top_k_index: torch.Tensor, num_experts: int):
    """Sort the ``T*k`` routing pairs by expert; see the module docstring for the three outputs."""
    if top_k_index.dim() != 2:
        raise ValueError(f"top_k_index must be [tokens, top_k], got shape {tuple(top_k_index.shape)}")
    if TRITON and (top_k_index.is_cuda or _INTERPRET):
        global _RK
        rk = _RK
        if rk is None:
            from host_plugin_scattermoe import routing_kernels as rk

            _RK = rk
        if top_k_index.dtype in rk.INT_DTYPES and 0 < num_experts <= rk.MAX_EXPERTS and top_k_index.numel():
            return rk.route_sort(top_k_index.reshape(-1), num_experts)
    return sort_tokens_torch(top_k_index, num_experts)


def sort_tokens_torch(top_k_index: torch.Tensor, num_experts: int):
    """The torch path of :func:`sort_tokens` (any device): a stable sort of int32 keys and one ``searchsorted``."""
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
