"""Triton counting sort of the routing pairs (``routing.sort_tokens`` on CUDA and under ``TRITON_INTERPRET=1``).

Same outputs as the torch path (``torch.sort(stable=True)`` of the int32-cast ids, then ``searchsorted``), bit for
bit, in one to three launches (two at T·k = 32768 and E ≤ 512) and no host synchronisation (safe under CUDA-graph
capture). H100, T·k = 32768, E = 128, per call: host 120 → 41 µs, GPU 49 → 14 µs with chunks of 1024 (~10 µs with
the 512 of ``route_block``), 17 → 2 kernels (``bench/bench_routing.py``).

* the ``N = T·k`` flat ids are cut into chunks of ``BLOCK``; each id goes to bucket ``clamp(id32, -1, E) + 1``
  (bucket 0: negative ids, ``1..E``: the experts, ``E+1``: ids ``≥ E``, the expert-parallel sentinels), with
  ``BP = next_pow2(E + 2)`` bins;
* ``_route_hist_kernel``: one histogram per chunk into ``counts [C, BP]``;
* the scan: ``_route_scan_kernel`` (one program per ``BB`` buckets, walking the chunks) turns ``counts`` into each
  chunk's start inside its bucket and writes the bucket totals; for small ``C·BP`` the scatter kernel instead reads
  every chunk's histogram itself (``SCAN=1``, two launches), and a single chunk needs neither (``SCAN=0``, one
  launch);
* ``_route_scatter_kernel``: per chunk, sorts ``(bucket << log2 BLOCK) | position`` in registers (``tl.sort``: the
  keys are unique, so the order is stable), and writes each pair to ``bucket start + chunk start in the bucket +
  rank in the chunk``; program 0 writes ``expert_offsets``. No atomics: the result is deterministic.

Ids below 0 (or at/above ``E``) all share one bucket, kept in (token, slot) order; ``torch.sort`` orders distinct such
values among themselves, so the two paths agree whenever each side holds a single out-of-range value (as an
expert-parallel sentinel does). In both paths they sit outside ``[0, expert_offsets[E-1])`` for ids ``≥ E`` and inside
expert 0's range for negative ids (``searchsorted`` counts them there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from host_plugin_scattermoe.kernels import INT32_LIMIT, INTERPRET, _cdiv, _next_pow2, store_bounded
from host_plugin_scattermoe.launch import launch as _launch

#: ids of these dtypes take the Triton path (any other dtype: the torch path)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
#: the largest ``E`` the Triton path takes (the bucket vectors live in registers)
MAX_EXPERTS = 4094
#: ``C·BP`` (chunk histograms) up to which the scatter kernel reads them all itself instead of a scan launch
FUSED_SCAN_LIMIT = 1 << 16


@triton.jit
def _route_bucket(Idx, offs, m, E):
    key = tl.load(Idx + offs, mask=m, other=0).to(tl.int32)
    return key, tl.minimum(tl.maximum(key, -1), E) + 1


@triton.jit
def _route_hist_kernel(Idx, Counts, N, E, BLOCK: tl.constexpr, BP: tl.constexpr, INT64: tl.constexpr):
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    _, b = _route_bucket(Idx, offs, m, E)
    tl.store(Counts + pid * BP + tl.arange(0, BP), tl.histogram(b, BP, mask=m).to(Counts.dtype.element_ty))


@triton.jit
def _route_scan_kernel(Counts, C, TOT, BP: tl.constexpr, BC: tl.constexpr, BB: tl.constexpr, INT64: tl.constexpr):
    """Column scan of ``counts [C, BP]`` for ``BB`` buckets: exclusive prefix over the chunks, in place; the bucket
    totals go to ``Counts + TOT`` (``TOT = C·BP``)."""
    cols = tl.program_id(0) * BB + tl.arange(0, BB)
    carry = tl.zeros([BB], dtype=Counts.dtype.element_ty)
    for c0 in range(0, C, BC):
        rows = c0 + tl.arange(0, BC)
        if INT64:
            rows = rows.to(tl.int64)
        m = rows[:, None] < C
        p = Counts + rows[:, None] * BP + cols[None, :]
        x = tl.load(p, mask=m, other=0)
        incl = tl.cumsum(x, 0)
        tl.store(p, incl - x + carry[None, :], mask=m)
        carry += tl.sum(x, 0)
    tl.store(Counts + TOT + cols, carry)


@triton.jit
def _route_scatter_kernel(
    Idx, Counts, Sei, Ssi, Offs, N, E, C, TOT,
    BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr, BP: tl.constexpr, SCAN: tl.constexpr, RC: tl.constexpr,
    RANK: tl.constexpr, RJ: tl.constexpr, INT64: tl.constexpr,
):
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    loc = tl.arange(0, BLOCK)
    start = pid * BLOCK
    offs = start + loc
    m = offs < N
    key, b = _route_bucket(Idx, offs, m, E)
    h = tl.histogram(b, BP, mask=m)
    if INT64:
        h = h.to(tl.int64)
    bins = tl.arange(0, BP)
    if SCAN == 0:  # a single chunk
        totals = h
        pref = tl.zeros_like(h)
    elif SCAN == 1:  # every chunk's histogram, read here
        totals = tl.zeros_like(h)
        pref = tl.zeros_like(h)
        for c0 in range(0, C, RC):
            rows = c0 + tl.arange(0, RC)
            if INT64:
                rows = rows.to(tl.int64)
            x = tl.load(Counts + rows[:, None] * BP + bins[None, :], mask=rows[:, None] < C, other=0).to(h.dtype)
            totals += tl.sum(x, 0)
            pref += tl.sum(tl.where(rows[:, None] < pid, x, 0), 0)
    else:  # scanned by _route_scan_kernel
        totals = tl.load(Counts + TOT + bins).to(h.dtype)
        pref = tl.load(Counts + pid * BP + bins).to(h.dtype)
    incl = tl.cumsum(totals, 0)
    if RANK == 0:
        # sorted position p of bucket b in this chunk goes to: b's start + the chunk's start in b + (p - b's first p)
        base = incl - totals + pref - (tl.cumsum(h, 0) - h)
        s = tl.sort((tl.where(m, b, BP) << LOG_BLOCK) | loc, 0)
        sb = s >> LOG_BLOCK
        src = start + (s & (BLOCK - 1))
        valid = sb < BP
        pos = tl.gather(base, tl.minimum(sb, BP - 1), 0) + loc
        oor = valid & ((sb == 0) | (sb == E + 1))
        raw = tl.load(Idx + src, mask=oor, other=0).to(tl.int32)
        tl.store(Sei + pos, tl.where(oor, raw, sb - 1).to(tl.int64), mask=valid)
        tl.store(Ssi + pos, src.to(tl.int64), mask=valid)
    else:
        # rank in the chunk = earlier pairs of the same bucket, counted RJ columns at a time
        rank = tl.zeros([BLOCK], dtype=tl.int32)
        for j0 in range(0, BLOCK, RJ):
            jj = j0 + tl.arange(0, RJ)
            _, bj = _route_bucket(Idx, start + jj, start + jj < N, E)
            same = (bj[None, :] == b[:, None]) & (jj[None, :] < loc[:, None])
            rank += tl.sum(same.to(tl.int32), 1)
        pos = tl.gather(incl - totals + pref, b, 0) + rank
        tl.store(Sei + pos, key.to(tl.int64), mask=m)
        tl.store(Ssi + pos, offs.to(tl.int64), mask=m)
    if pid == 0:
        tl.store(Offs + bins - 1, incl.to(tl.int64), mask=(bins >= 1) & (bins <= E))


def route_block(n: int) -> int:
    """Chunk size for ``n`` pairs. A program's in-register sort gets slower faster than its chunk grows (H100, N = 32768,
    E = 128, GPU µs per call: chunks of 256/512 8.9-10.9, 1024 14.6, 2048 27.2), so chunks stay at 512 up to 2**18
    pairs (one chunk, one launch, up to 512 pairs), then grow to keep the chunk histograms small. Interpreter: at
    most 256 (the pairwise rank's ``[BLOCK, BLOCK]`` compare is one numpy op)."""
    if INTERPRET:
        return max(16, min(256, _next_pow2(n)))
    if n <= (1 << 18):
        return 512
    if n <= (1 << 20):
        return 1024
    return 2048


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8


_PLANS: dict = {}
_MAX_PLANS = 256


class _Plan:
    __slots__ = ("C", "tot", "scan", "counts_len", "counts_dtype", "hist", "scan_l", "scatter")


def _make_plan(N: int, E: int, block, scan, rank, int64) -> _Plan:
    BP = _next_pow2(E + 2)
    BLOCK = block or route_block(N)
    if rank is None:
        rank = 1 if INTERPRET else 0
    if BLOCK & (BLOCK - 1) or BLOCK < 16:
        raise ValueError(f"route_sort: block must be a power of two >= 16, got {BLOCK}")
    C = _cdiv(N, BLOCK)
    if int64 is None:
        int64 = N + BLOCK >= INT32_LIMIT or (C + 1) * BP >= INT32_LIMIT
    if scan is None:
        scan = 0 if C == 1 else 1 if C * BP <= FUSED_SCAN_LIMIT else 2
    elif scan == 0 and C != 1:
        raise ValueError(f"route_sort: scan=0 needs a single chunk, got {C} chunks of {BLOCK}")
    p = _Plan()
    p.C, p.tot, p.scan = C, C * BP, scan
    p.counts_len, p.counts_dtype = (C + 1) * BP, torch.int64 if int64 else torch.int32
    w = _warps(BLOCK)
    # (grid, constexprs + launch options, launch.py slot) of each launch
    p.hist = ((C, 1, 1), dict(BLOCK=BLOCK, BP=BP, INT64=int64, num_warps=w), {})
    BB = min(BP, 64)
    p.scan_l = ((BP // BB, 1, 1), dict(BP=BP, BC=64, BB=BB, INT64=int64, num_warps=4), {})
    RC = max(1, min(64, 4096 // BP)) if not INTERPRET else 8
    RJ = BLOCK if INTERPRET else min(BLOCK, 32)
    p.scatter = ((C, 1, 1), dict(BLOCK=BLOCK, LOG_BLOCK=BLOCK.bit_length() - 1, BP=BP, SCAN=scan, RC=RC, RANK=rank,
                                 RJ=RJ, INT64=int64, num_warps=w), {})
    return p


def route_sort(flat: torch.Tensor, num_experts: int, *, block: int | None = None, scan: int | None = None,
               rank: int | None = None, int64: bool | None = None):
    """``(sorted_expert_idxs, sorted_scattered_idxs, expert_offsets)`` of the flat ids (see ``routing``).
    ``block``, ``scan`` (0, 1, 2: see the module docstring), ``rank`` (0: ``tl.sort``, 1: pairwise counts) and
    ``int64`` override the rule (tests, benches). The launch plan is cached per (N, E, overrides)."""
    if flat.stride(0) != 1:  # reshape(-1) of a strided [T, k] view can be a strided view
        flat = flat.contiguous()
    N = flat.numel()
    key = (N, num_experts, block, scan, rank, int64)
    p = _PLANS.get(key)
    if p is None:
        p = store_bounded(_PLANS, key, _make_plan(N, int(num_experts), block, scan, rank, int64), _MAX_PLANS)
    dev = flat.device
    sei = torch.empty(N, device=dev, dtype=torch.int64)
    ssi = torch.empty(N, device=dev, dtype=torch.int64)
    offs = torch.empty(num_experts, device=dev, dtype=torch.int64)
    if p.scan:
        counts = torch.empty(p.counts_len, device=dev, dtype=p.counts_dtype)
        g, kw, slot = p.hist
        _launch(_route_hist_kernel, g, (flat, counts, N, num_experts), kw, slot)
        if p.scan == 2:
            g, kw, slot = p.scan_l
            _launch(_route_scan_kernel, g, (counts, p.C, p.tot), kw, slot)
    else:
        counts = sei  # not read
    g, kw, slot = p.scatter
    _launch(_route_scatter_kernel, g, (flat, counts, sei, ssi, offs, N, num_experts, p.C, p.tot), kw, slot)
    return sei, ssi, offs
