"""Triton kernels of the ScatterMoE experts path (internal launchers; the stable entry is ``ops``).

All kernels work on the routing of :func:`host_plugin_scattermoe.routing.sort_tokens` and the
kernel layout of :mod:`host_plugin_scattermoe.reference` (``W [E, K, N]``, ``A [E, r, K]``,
``B [E, N, r]``, any strides; transposed views are free).

* ``scatter2scatter``: for every block of ``BLOCK_M`` sorted rows of *one* expert (blocks never
  straddle experts: each program finds its expert from ``expert_offsets`` on the device, so there
  is no host synchronisation and no padding), gathers the input rows in the GEMM prologue
  (``x[ssi // k]`` or grouped rows), computes ``x W_e`` and, with LoRA, either

  - ``LORA=1`` (fused): ``x A_eᵀ`` accumulated in the same K loop (one extra ``[BLOCK_M, r]``
    accumulator), then ``+ scaling · (x A_eᵀ) B_eᵀ`` in the epilogue, or
  - ``LORA=2`` (split epilogue): the rank-``r`` intermediate ``x A_eᵀ`` was produced by a separate
    rank-``r`` grouped GEMM (this same kernel with ``W = Aᵀ``) and only ``· B_eᵀ`` runs here,

  adds the per-expert bias and scatters the rows straight to their destination in the epilogue
  (grouped order, or the flat ``t*k+j`` order). ``WRITE_XA`` stores the rank-``r`` intermediate
  (grouped, fp32) for the backward pass. ``GLU_FWD`` (``act_out=``): the up projection of a SiLU-gated
  MLP also writes ``act = silu(h_gate)·h_up`` (each program: half a tile of gate columns and the
  matching up columns). The backward ``dX = dY Wᵀ + s (dY B) A`` is this same kernel on
  transposed views (``W → Wᵀ``, ``A → Bᵀ``, ``B → Aᵀ``), LoRA fused, writing ``dY·B``.
* ``group_outer``: per expert, ``out_e = scaling · Σ_rows L[row]ᵀ R[row]`` with either operand
  gathered through ``ssi``; grid ``(E, P/BLOCK_P, Q/BLOCK_Q)``, each program walks its expert's
  rows from the device-side offsets. ``dA = s·(dY B)ᵀ X``, ``dB = s·dYᵀ (X Aᵀ)`` and the
  full-fine-tune ``dW = Xᵀ dY`` are all this one kernel: the LoRA gradients are grouped products
  over the rank-sized intermediates, never an ``[N, K]`` product.
* ``combine``: ``out[t] = Σ_j gates[t, j] · y[t*k + j]`` (fp32 accumulation); ``combine_bwd``
  writes ``dy`` and reduces ``dgates`` in one pass over ``y`` (no ``[T·k, N]`` fp32 temporaries).

Index arithmetic is int32 unless a buffer reaches ``2**31`` elements, in which case the
``INT64`` variant (a separate specialisation, so the int32 path pays nothing) is launched.
On a GPU, tiles come from a deterministic rule (``s2s_rule`` / ``outer_rule``, fitted to an H200
sweep of every launch of a real block step), pruned by the device's shared memory and registers per
block (read from the driver); ``SCATTERMOE_TILES=autotune`` uses Triton's autotuner instead. On a
Hopper-class device the rule's large tiles load W, and x when it is already grouped, through TMA tensor
descriptors built on the host (``_tma_descs``; ``SCATTERMOE_TMA=0`` restores pointer loads everywhere);
gathered rows keep pointer loads (cp.async), since Hopper's TMA has no row gather. Under
``TRITON_INTERPRET=1`` one small fixed configuration is used (the interpreter cannot autotune).
``clamped_glu_fwd``/``_bwd`` are gpt-oss's interleaved, clamped sigmoid-GLU (one pass each way instead of
torch's ~7 elementwise kernels and their ~12 backward ones over ``[T·k, 2I]``).
``glu_down_dx`` is the down projection's dX with the SiLU-GLU backward, the routing-weight scaling
and the routing-weight gradient in its epilogue (``GLU_BWD=1``; see ``fused.py``), or with the routing-weight scaling
and gradient only (``glu=False``: ``GLU_BWD=2/3``, the merged node's ``"gemm"`` light tail). ``silu_glu_gate_bwd`` is
the SiLU-GLU backward that applies the routing weight to ``d(act) / g`` and reduces the routing weight's gradient (the
merged node's default ``"glu"`` light tail; see ``ops._GluExpertsFunction``).
"""

from __future__ import annotations

import functools
import os
import re

import torch
import triton
import triton.language as tl

from host_plugin_scattermoe.launch import launch as _launch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
INT32_LIMIT = 2**31


def needs_int64(*tensors) -> bool:
    """True when any buffer reaches 2**31 elements (or its last element's offset would)."""
    for t in tensors:
        if t is None:
            continue
        n = t.numel()
        if n >= INT32_LIMIT:
            return True
        if n and isinstance(t, torch.Tensor) and t.is_contiguous():
            continue  # its last element's offset is n - 1 (host time: this runs for every launch)
        span = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0)
        if span >= INT32_LIMIT:
            return True
    return False


def _cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` for host ints: Triton 3.6 wraps it as a ``constexpr_function``, whose call costs
    microseconds (argument unwrapping), and launch bookkeeping calls it a dozen times per step."""
    return -(-a // b)


def _next_pow2(n: int) -> int:
    """``triton.next_power_of_2`` for host ints (0 for 0, as Triton's), without its ``constexpr_function`` wrapper."""
    n = int(n)
    return 1 << (n - 1).bit_length() if n > 0 else 0


def m_bucket(m: int) -> int:
    """Autotune bucket of a row count: the next power of two (at least 256)."""
    return max(256, _next_pow2(max(int(m), 1)))


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _tl_dtype(dtype: torch.dtype):
    try:
        return _TL_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"scattermoe kernels support float32/float16/bfloat16, got {dtype}") from None


def rank_block(r: int) -> int:
    return max(16, _next_pow2(max(int(r), 1)))


def expert_block(E: int) -> int:
    """``E_POW2`` of :func:`locate_block`: the expert-vector width, E's next power of two but at least 64 (the width
    every launch of this plugin has used on the GPU since its first GPU tests; narrower ones were never run there)."""
    return max(64, _next_pow2(E))


# ------------------------------------------------------------------------------------------------
# device-aware autotune pruning
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def device_limits(index: int | None = None) -> dict:
    """Shared memory (bytes) and registers per block of the current CUDA device."""
    if index is None:
        index = torch.cuda.current_device()
    try:
        props = triton.runtime.driver.active.utils.get_device_properties(index)
        return {"smem": int(props["max_shared_mem"]), "regs": int(props["max_num_regs"])}
    except Exception:  # pragma: no cover - older triton / no driver
        p = torch.cuda.get_device_properties(index)
        smem = getattr(p, "shared_memory_per_block_optin", 99 * 1024)
        return {"smem": int(smem), "regs": int(getattr(p, "regs_per_multiprocessor", 65536))}


_SMEM_SLACK = 8 * 1024  # layout conversion scratch / barriers
_MAX_REGS_PER_THREAD = 255


def fits_device(smem_bytes: int, acc_elems: int, num_warps: int, limits: dict) -> bool:
    threads = num_warps * 32
    # fp32 accumulators live in registers; operands are staged through shared memory.
    est_regs = acc_elems / threads + 40
    reg_cap = min(_MAX_REGS_PER_THREAD, limits["regs"] // threads)
    return smem_bytes <= limits["smem"] - _SMEM_SLACK and est_regs <= reg_cap


def _elt(named_args, name) -> int:
    t = named_args.get(name)
    return t.element_size() if hasattr(t, "element_size") else 2


def _prune_s2s(configs, named_args, **kwargs):
    limits = device_limits()
    lora = named_args.get("LORA", kwargs.get("LORA", 0))
    br = named_args.get("BLOCK_R", kwargs.get("BLOCK_R", 16))
    elt = _elt(named_args, "X")
    N = named_args.get("N", 1 << 30)
    kept, scored = [], []
    for c in configs:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if bn > max(16, _next_pow2(N)) or (N >= 128 and bn < 64):
            continue  # tile wider than the output (wasted work) or needlessly thin
        smem = c.num_stages * (bm * bk + bk * bn) * elt
        acc = bm * bn
        if lora == 1:
            smem += c.num_stages * br * bk * elt + bn * br * elt
            acc += bm * br
        elif lora == 2:
            smem += bn * br * elt + bm * br * 4
        scored.append((smem + acc, c))
        # a warp-specialised tile's accumulator lives in two consumer warp groups of num_warps each
        if fits_device(smem, acc, c.num_warps * (2 if c.kwargs.get("WS") else 1), limits):
            kept.append(c)
    if kept:
        return kept
    scored.sort(key=lambda sc: sc[0])
    return [scored[0][1]] if scored else [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _prune_outer(configs, named_args, **kwargs):
    limits = device_limits()
    elt = _elt(named_args, "Rp")
    P, Q = named_args.get("P", 1 << 30), named_args.get("Q", 1 << 30)
    kept, scored = [], []
    for c in configs:
        bm, bp, bq = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_P"], c.kwargs["BLOCK_Q"]
        if bp > max(16, _next_pow2(P)) or bq > max(16, _next_pow2(Q)):
            continue
        if (P >= 128 and bp < 64) or (Q >= 128 and bq < 64):
            continue
        smem = c.num_stages * bm * (bp + bq) * 4  # operands may be fp32 (rank intermediates)
        acc = bp * bq
        scored.append((smem + acc, c))
        if fits_device(smem, acc, c.num_warps, limits):
            kept.append(c)
    if kept:
        return kept
    scored.sort(key=lambda sc: sc[0])
    if scored:
        return [scored[0][1]]
    return [min(configs, key=lambda c: c.kwargs["BLOCK_P"] * c.kwargs["BLOCK_Q"])]


def _s2s_configs():
    out = []
    for bm, bn, bk, g, w, s in [
        (128, 128, 64, 8, 8, 3),
        (128, 128, 64, 8, 4, 4),
        (64, 128, 64, 8, 4, 4),
        (64, 128, 64, 1, 4, 4),  # the unswizzled order, kept so tuning can only improve on it
        (128, 64, 64, 8, 4, 4),
        (128, 256, 64, 8, 8, 3),
        (64, 256, 64, 8, 8, 3),
        (64, 64, 64, 8, 4, 4),
        (64, 32, 64, 8, 4, 4),
        (64, 16, 128, 8, 4, 3),  # rank-r GEMMs of the split path (N = r)
        (128, 16, 128, 8, 4, 4),
        (256, 16, 64, 8, 8, 3),
    ]:
        out.append(
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g}, num_warps=w, num_stages=s)
        )
    return out


def _outer_configs():
    out = []
    for bm, bp, bq, w, s in [
        (64, 16, 128, 4, 3),
        (128, 16, 128, 4, 3),
        (64, 16, 256, 8, 3),
        (64, 128, 16, 4, 3),
        (128, 128, 16, 4, 3),
        (64, 256, 16, 8, 3),
        (64, 128, 128, 8, 3),
        (64, 128, 64, 4, 3),
        (64, 64, 64, 4, 3),
    ]:
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_P": bp, "BLOCK_Q": bq}, num_warps=w, num_stages=s))
    return out


def _bench(fn, quantiles=None):
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _locate_block_chunked(pid_m, offsets_ptr, E, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    """:func:`locate_block` for the warp-specialised tile: the same ``(expert, first sorted row, end row)`` from 64
    experts at a time, with no ``tl.cumsum`` and no vector wider than 64. Triton 3.6's Hopper warp-specialisation pass
    fails on both (a scan region: "Other parent ops are not supported"; a 128-wide load feeding the TMA coordinates:
    an assertion in ``WSLowerToken``). Row blocks are counted as there; since their running sum ``cum`` rises with
    the expert, the experts before this block's are those with ``cum <= pid_m``: its first block is the sum of their
    block counts, its first row the largest of their ends, its end the smallest end of the others."""
    CH: tl.constexpr = 64
    j = tl.arange(0, CH)
    carry = pid_m * 0
    e = pid_m * 0
    first_blk = pid_m * 0
    start = pid_m * 0
    end = pid_m * 0 + 2147483647
    for c in tl.static_range(E_POW2 // CH):
        eidx = c * CH + j
        emask = eidx < E
        ends = tl.load(offsets_ptr + eidx, mask=emask, other=0).to(tl.int32)
        starts = tl.load(offsets_ptr + eidx - 1, mask=emask & (eidx > 0), other=0).to(tl.int32)
        nblk = tl.where(emask, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
        cum = nblk
        for i in tl.static_range(6):  # an inclusive prefix sum of 64 in 6 shifted adds
            cum = cum + tl.where(j >= (1 << i), tl.gather(cum, tl.maximum(j - (1 << i), 0), 0), 0)
        cum += carry
        before = emask & (cum <= pid_m)
        e += tl.sum(before.to(tl.int32), 0)
        first_blk += tl.sum(tl.where(before, nblk, 0), 0)
        start = tl.maximum(start, tl.max(tl.where(before, ends, 0), 0))
        end = tl.minimum(end, tl.min(tl.where(emask & ~before, ends, 2147483647), 0))
        carry += tl.sum(nblk, 0)
    return e, start + (pid_m - first_blk) * BLOCK_M, end


@triton.jit
def locate_block(pid_m, offsets_ptr, E, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    """Map a program's M index to (expert, first sorted row, expert's end row); ``E_POW2`` = :func:`expert_block`."""
    eidx = tl.arange(0, E_POW2)
    emask = eidx < E
    ends = tl.load(offsets_ptr + eidx, mask=emask, other=0).to(tl.int32)
    starts = tl.load(offsets_ptr + eidx - 1, mask=emask & (eidx > 0), other=0).to(tl.int32)
    nblk = tl.where(emask, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    cum = tl.cumsum(nblk, 0)
    e = tl.sum((cum <= pid_m).to(tl.int32), 0)
    sel = eidx == e
    first_blk = tl.sum(tl.where(sel, cum - nblk, 0), 0)
    start = tl.sum(tl.where(sel, starts, 0), 0)
    end = tl.sum(tl.where(sel, ends, 0), 0)
    return e, start + (pid_m - first_blk) * BLOCK_M, end


@triton.jit
def gather_index(ssi_ptr, rows, mask, INT64: tl.constexpr):
    """Sorted positions ``rows`` and their flat ``t*k+j`` indices ``ssi[rows]``, both in the launch's
    index width (int64 only for the ``INT64`` specialisation)."""
    sidx = tl.load(ssi_ptr + rows, mask=mask, other=0)
    if INT64:
        rows = rows.to(tl.int64)
        sidx = sidx.to(tl.int64)
    else:
        sidx = sidx.to(tl.int32)
    return rows, sidx


@triton.jit
def block_rows(
    row0, end, ssi_ptr, FAN_OUT,
    X_GROUPED: tl.constexpr, Y_GROUPED: tl.constexpr, INT64: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Prologue of a scatter2scatter-style kernel for the row block at ``row0`` (from ``locate_block``):
    ``(rows, mask, x_rows, y_rows)`` = the sorted positions, the rows to read (grouped, or token
    ``ssi // FAN_OUT``) and the rows to write (grouped, or flat ``ssi``)."""
    rows = row0 + tl.arange(0, BLOCK_M)
    mask = rows < end
    rows, sidx = gather_index(ssi_ptr, rows, mask, INT64)
    if X_GROUPED:
        x_rows = rows
    else:
        x_rows = sidx // FAN_OUT
    if Y_GROUPED:
        y_rows = rows
    else:
        y_rows = sidx
    return rows, mask, x_rows, y_rows


@triton.jit
def _swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """1-D program id → (pid_m, pid_n), walking ``GROUP_M`` row blocks across all column blocks.

    Consecutive row blocks mostly belong to one expert, so a group's programs run together and
    share that expert's weight slab and the group's gathered rows in L2: the weights are read from
    HBM about once instead of once per row block (the block is weight-bandwidth bound otherwise).
    """
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % size_m, (pid % per_group) // size_m


@triton.jit
def _w_tile(Wd, w_ptrs, e, w_width, col0, k0, K, k_mask, n_mask, W_DESC: tl.constexpr, EVEN_K: tl.constexpr,
            EVEN_N: tl.constexpr):
    """The ``[BLOCK_K, BLOCK_N]`` W tile of expert ``e`` at rows ``k0``, columns ``col0`` (``w_ptrs`` the same tile's
    pointers for pointer loads; ``w_width`` W's columns per expert)."""
    if W_DESC == 1:  # W_e stored [N, K] (K contiguous): box [BLOCK_N, BLOCK_K], used transposed
        w = tl.trans(Wd.load([e * w_width + col0, k0]))
    elif W_DESC == 2:  # W_e stored [K, N] (N contiguous)
        w = Wd.load([e * K + k0, col0])
    elif EVEN_K:
        if EVEN_N:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=n_mask[None, :], other=0.0)
    else:
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
    return w


@triton.jit
def _s2s_tile(
    pid_n, e, row0, end, k_stop,
    X, W, Y, A, Bm, XA_in, XA_out, Bias, ssi_ptr, offsets_ptr,
    K, N, R, E, FAN_OUT, M_BUCKET,
    s_xm, s_xk, s_we, s_wk, s_wn, s_ym, s_yn,
    s_ae, s_ar, s_ak, s_be, s_bn, s_br,
    s_xam, s_xar, s_bias_e, s_bias_n,
    scaling,
    Gates, Hin, DGP, s_hm, s_dgp,
    Wd, Xd, glu_alpha, glu_limit,
    X_GROUPED: tl.constexpr, Y_GROUPED: tl.constexpr, LORA: tl.constexpr, WRITE_XA: tl.constexpr,
    HAS_BIAS: tl.constexpr, INT64: tl.constexpr, DOT_PREC: tl.constexpr, E_POW2: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, GLU_BWD: tl.constexpr,
    W_DESC: tl.constexpr, X_DESC: tl.constexpr, GLU_FWD: tl.constexpr, WS: tl.constexpr,
):
    """One output tile of ``_s2s_kernel``: rows ``row0 .. min(row0 + BLOCK_M, end)`` of expert ``e``, column block
    ``pid_n`` (the GEMM K loop up to ``k_stop``: ``K``, or 0 for a tile of no rows; LoRA, bias and the epilogue store).
    ``WS``: the K loop warp-specialised (see ``_s2s_kernel``).

    ``GLU_FWD == 1`` (the up projection of a SiLU-gated MLP, ``scatter2scatter(act_out=...)``): W has ``2N`` columns (gate
    ``[0, N)``, up ``[N, 2N)``) and the column block is the gate columns ``pid_n·BLOCK_N + [0, BLOCK_N)`` and the
    same up columns ``N + …``: two W tiles per K step into two accumulators (the same registers as one tile twice
    as wide), the LoRA epilogue split the same way. The epilogue stores both halves of ``h`` and
    ``act = silu(g)·u`` (``Hin``, row stride ``s_hm``) from the rounded ``h`` values with
    ``_silu_glu_fwd_kernel``'s fp32 formula, so ``h`` and ``act`` are bitwise the two separate launches'.
    ``GLU_FWD == 2`` (gpt-oss, ``act_clamp=(alpha, limit)``): interleaved gate/up columns in the one plain tile; the
    epilogue splits the rounded tile's column pairs and writes ``_clamped_glu_fwd_kernel``'s ``act`` (``glu_alpha``,
    ``glu_limit``; unused otherwise)."""
    e64 = e.to(tl.int64)
    rows, m_mask, x_rows, y_rows = block_rows(row0, end, ssi_ptr, FAN_OUT, X_GROUPED, Y_GROUPED, INT64, BLOCK_M)

    n_offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_offs < N
    k_base = tl.arange(0, BLOCK_K)
    r_offs = tl.arange(0, BLOCK_R)
    r_mask = r_offs < R

    x_ptrs = X + x_rows[:, None] * s_xm + k_base[None, :] * s_xk
    w_ptrs = W + e64 * s_we + k_base[:, None] * s_wk + n_offs[None, :] * s_wn
    a_ptrs = A + e64 * s_ae + r_offs[:, None] * s_ar + k_base[None, :] * s_ak
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    n0 = pid_n * BLOCK_N
    w_width = N  # W's columns per expert (the descriptor's row stride between experts for W_DESC == 1)
    if GLU_FWD == 1:
        w_width = 2 * N
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # the up half: W columns N + n_offs
    for k0 in tl.range(0, k_stop, BLOCK_K, warp_specialize=WS):
        k_mask = (k0 + k_base) < K
        # Operand tiles: through a TMA descriptor (host-built, see _tma_descs) or pointer loads.
        # A descriptor box that runs past the expert's last row reads the next expert's rows: for x
        # those rows are masked in the epilogue; for W (K-major rows past this expert's K) they
        # meet x columns >= K, which are zero (TMA zero fill / the k mask).
        if X_DESC:
            x = Xd.load([row0, k0])
        elif EVEN_K:
            x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        else:
            x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = _w_tile(Wd, w_ptrs, e, w_width, n0, k0, K, k_mask, n_mask, W_DESC, EVEN_K, EVEN_N)
        acc += tl.dot(x, w.to(x.dtype), input_precision=DOT_PREC)
        if GLU_FWD == 1:
            wu = _w_tile(Wd, w_ptrs + N * s_wn, e, w_width, N + n0, k0, K, k_mask, n_mask, W_DESC, EVEN_K, EVEN_N)
            acc_u += tl.dot(x, wu.to(x.dtype), input_precision=DOT_PREC)
        if LORA == 1:
            if EVEN_K:
                a = tl.load(a_ptrs, mask=r_mask[:, None], other=0.0)
            else:
                a = tl.load(a_ptrs, mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            xa += tl.dot(x, tl.trans(a.to(x.dtype)), input_precision=DOT_PREC)
            a_ptrs += BLOCK_K * s_ak
        if not X_DESC:
            x_ptrs += BLOCK_K * s_xk
        if W_DESC == 0:
            w_ptrs += BLOCK_K * s_wk

    if GLU_BWD >= 2:
        # gate epilogue (light tail): the routing weight of each row (sorted position -> flat t*k+j -> gates)
        g_sidx = tl.load(ssi_ptr + rows, mask=m_mask, other=0)
        gv = tl.load(Gates + g_sidx, mask=m_mask, other=0.0).to(tl.float32)
    if LORA != 0:
        if LORA == 2:
            if WS:  # XA_in a descriptor of [L, R]: columns past R read as zero
                xa = XA_in.load([row0, 0])
            else:
                xa = tl.load(
                    XA_in + rows[:, None] * s_xam + r_offs[None, :] * s_xar,
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0,
                ).to(tl.float32)
        if WRITE_XA:
            if pid_n == 0:
                xa_w = xa
                if GLU_BWD >= 2:  # dA of the down projection wants g·(dout·B): the row's routing weight on the rank side
                    xa_w = xa * gv[:, None]
                tl.store(
                    XA_out + rows[:, None] * s_xam + r_offs[None, :] * s_xar, xa_w,
                    mask=m_mask[:, None] & r_mask[None, :],
                )
        xs = (xa * scaling).to(X.dtype.element_ty)
        if WS:
            # Bm a descriptor of B as [E·R, N] (N contiguous), box [BLOCK_R, BLOCK_N]: rows past this expert's R
            # meet xa's zero columns
            acc = tl.dot(xs, Bm.load([e * R, n0]).to(xs.dtype), acc, input_precision=DOT_PREC)
        else:
            b_ptrs = Bm + e64 * s_be + n_offs[:, None] * s_bn + r_offs[None, :] * s_br
            b = tl.load(b_ptrs, mask=n_mask[:, None] & r_mask[None, :], other=0.0)
            b = b.to(X.dtype.element_ty)
            # Accumulate in place: a separate [BLOCK_M, BLOCK_N] product tile would double the
            # accumulator registers and push the tuner to small tiles.
            acc = tl.dot(xs, tl.trans(b), acc, input_precision=DOT_PREC)
        if GLU_FWD == 1:
            bu = tl.load(b_ptrs + N * s_bn, mask=n_mask[:, None] & r_mask[None, :], other=0.0)
            acc_u = tl.dot(xs, tl.trans(bu.to(X.dtype.element_ty)), acc_u, input_precision=DOT_PREC)
    if HAS_BIAS:
        bias_ptrs = Bias + e64 * s_bias_e + n_offs * s_bias_n
        bias = tl.load(bias_ptrs, mask=n_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
        if GLU_FWD == 1:
            acc_u += tl.load(bias_ptrs + N * s_bias_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if GLU_BWD == 1:
        # dX of the down projection fed the *token* gradient (x rows = dout[t]), so acc = d(act) / g.
        # Here, per row (sorted position, grouped h [L, 2N]): the routing weight g of the row, the
        # combine's gradient dg = Σ_n act·acc (a partial per column block; act = silu(h_g)·h_u
        # recomputed in fp32 from h), and the SiLU-GLU backward of d(act) = g·acc written as
        # dh = [d gate | d up] in Y. dy = g·dout, d(act) and the expert outputs never exist.
        sidx = tl.load(ssi_ptr + rows, mask=m_mask, other=0)
        gv = tl.load(Gates + sidx, mask=m_mask, other=0.0).to(tl.float32)
        hmask = m_mask[:, None] & n_mask[None, :]
        h_off = rows[:, None] * s_hm + n_offs[None, :]
        hg = tl.load(Hin + h_off, mask=hmask, other=0.0).to(tl.float32)
        sg = tl.sigmoid(hg)
        hu = tl.load(Hin + h_off + N, mask=hmask, other=0.0).to(tl.float32)
        silu = hg * sg
        tl.store(DGP + pid_n * s_dgp + sidx, tl.sum(silu * hu * acc, 1), mask=m_mask)
        da = acc * gv[:, None]
        y_off = y_rows[:, None] * s_ym + n_offs[None, :] * s_yn
        tl.store(Y + y_off + N * s_yn, (da * silu).to(Y.dtype.element_ty), mask=hmask)
        tl.store(Y + y_off, (da * hu * (sg + silu * (1.0 - sg))).to(Y.dtype.element_ty), mask=hmask)
    elif GLU_BWD >= 2:
        # The light tail (ops.glu_experts' backward): dX of the down projection fed the token gradient, so
        # acc = d(act) / g. The epilogue scales each row by its routing weight, writing d(act) (grouped), and with
        # GLU_BWD == 2 reduces the routing weight's gradient dg = <dout, y> = Σ_n act·acc against the saved
        # activation act ([L, N] grouped, in Hin), one fp32 partial per column block. The SiLU-GLU backward stays
        # its own kernel: the epilogue holds one [BLOCK_M, BLOCK_N] tile beside the accumulator, not two.
        omask = m_mask[:, None] & n_mask[None, :]
        if GLU_BWD == 2:
            act = tl.load(Hin + rows[:, None] * s_hm + n_offs[None, :], mask=omask, other=0.0).to(tl.float32)
            tl.store(DGP + pid_n * s_dgp + g_sidx, tl.sum(act * acc, 1), mask=m_mask)
        tl.store(
            Y + y_rows[:, None] * s_ym + n_offs[None, :] * s_yn,
            (acc * gv[:, None]).to(Y.dtype.element_ty),
            mask=omask,
        )
    elif GLU_FWD == 1:
        # h's two halves, then act = silu(g)·u from the values h holds (rounded to its dtype), in fp32 as
        # _silu_glu_fwd_kernel computes it: the backward reads h, the down projection act.
        omask = m_mask[:, None] & n_mask[None, :]
        y_off = y_rows[:, None] * s_ym + n_offs[None, :] * s_yn
        hg = acc.to(Y.dtype.element_ty)
        hu = acc_u.to(Y.dtype.element_ty)
        tl.store(Y + y_off, hg, mask=omask)
        tl.store(Y + y_off + N * s_yn, hu, mask=omask)
        g = hg.to(tl.float32)
        act = g * tl.sigmoid(g) * hu.to(tl.float32)
        tl.store(Hin + y_rows[:, None] * s_hm + n_offs[None, :], act.to(Hin.dtype.element_ty), mask=omask)
    elif GLU_FWD == 2:
        # gpt-oss: interleaved columns (gate 2i, up 2i+1) in one tile. h as the plain launch stores it, then the pairs
        # of the rounded tile split apart and act computed as _clamped_glu_fwd_kernel does (act column i = pair i).
        omask = m_mask[:, None] & n_mask[None, :]
        hv = acc.to(Y.dtype.element_ty)
        tl.store(Y + y_rows[:, None] * s_ym + n_offs[None, :] * s_yn, hv, mask=omask)
        g, u = tl.split(tl.reshape(hv, (BLOCK_M, BLOCK_N // 2, 2)))
        g = tl.minimum(g.to(tl.float32), glu_limit)
        u = tl.minimum(tl.maximum(u.to(tl.float32), -glu_limit), glu_limit)
        act = (u + 1.0) * (g * tl.sigmoid(glu_alpha * g))
        c_offs = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(Hin + y_rows[:, None] * s_hm + c_offs[None, :], act.to(Hin.dtype.element_ty),
                 mask=m_mask[:, None] & (c_offs < N // 2)[None, :])
    else:
        tl.store(
            Y + y_rows[:, None] * s_ym + n_offs[None, :] * s_yn,
            acc.to(Y.dtype.element_ty),
            mask=m_mask[:, None] & n_mask[None, :],
        )




@triton.jit
def _s2s_kernel(
    X, W, Y, A, Bm, XA_in, XA_out, Bias, ssi_ptr, offsets_ptr,
    K, N, R, E, FAN_OUT, M_BUCKET,
    s_xm, s_xk, s_we, s_wk, s_wn, s_ym, s_yn,
    s_ae, s_ar, s_ak, s_be, s_bn, s_br,
    s_xam, s_xar, s_bias_e, s_bias_n,
    scaling,
    Gates, Hin, DGP, s_hm, s_dgp,
    Wd, Xd, glu_alpha, glu_limit,
    X_GROUPED: tl.constexpr, Y_GROUPED: tl.constexpr, LORA: tl.constexpr, WRITE_XA: tl.constexpr,
    HAS_BIAS: tl.constexpr, INT64: tl.constexpr, DOT_PREC: tl.constexpr, E_POW2: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, GLU_BWD: tl.constexpr,
    W_DESC: tl.constexpr = 0, X_DESC: tl.constexpr = False, PERSISTENT: tl.constexpr = False,
    HALF_TAIL: tl.constexpr = False, GLU_FWD: tl.constexpr = 0, WS: tl.constexpr = False, FLATTEN: tl.constexpr = True,
):
    num_pid_n = tl.cdiv(N, BLOCK_N)
    if PERSISTENT:
        # One program per SM walks the tiles (row block, column block) with a stride of the grid; the row blocks
        # are counted exactly from the offsets (no idle upper-bound programs), and the flattened loop lets the
        # pipeliner issue the next tile's first loads under this tile's epilogue.
        eidx = tl.arange(0, E_POW2)
        emask = eidx < E
        ends = tl.load(offsets_ptr + eidx, mask=emask, other=0).to(tl.int32)
        starts = tl.load(offsets_ptr + eidx - 1, mask=emask & (eidx > 0), other=0).to(tl.int32)
        nblk = tl.where(emask, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
        cum = tl.cumsum(nblk, 0)
        num_pid_m = tl.sum(nblk, 0)
        # FLATTEN=False: each tile's K loop pipelined on its own (the tile loop is not flattened into it)
        for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, tl.num_programs(0), flatten=FLATTEN):
            pid_m, pid_n = _swizzle(tile, num_pid_m, num_pid_n, GROUP_M)
            e = tl.sum((cum <= pid_m).to(tl.int32), 0)
            sel = eidx == e
            first_blk = tl.sum(tl.where(sel, cum - nblk, 0), 0)
            row0 = tl.sum(tl.where(sel, starts, 0), 0) + (pid_m - first_blk) * BLOCK_M
            end = tl.sum(tl.where(sel, ends, 0), 0)
            if HALF_TAIL and end - row0 <= BLOCK_M // 2:
                # an expert's last row block with at most half a tile of rows: a half-height tile (x through pointer
                # loads: the descriptor's box is BLOCK_M rows)
                _s2s_tile(
                    pid_n, e, row0, end, K,
                    X, W, Y, A, Bm, XA_in, XA_out, Bias, ssi_ptr, offsets_ptr, K, N, R, E, FAN_OUT, M_BUCKET,
                    s_xm, s_xk, s_we, s_wk, s_wn, s_ym, s_yn, s_ae, s_ar, s_ak, s_be, s_bn, s_br, s_xam, s_xar, s_bias_e, s_bias_n,
                    scaling, Gates, Hin, DGP, s_hm, s_dgp, Wd, Xd, glu_alpha, glu_limit,
                    X_GROUPED, Y_GROUPED, LORA, WRITE_XA, HAS_BIAS, INT64, DOT_PREC, E_POW2, BLOCK_R, BLOCK_M // 2, BLOCK_N, BLOCK_K,
                    GROUP_M, EVEN_K, EVEN_N, GLU_BWD, W_DESC, False, GLU_FWD, False,
                )
            else:
                _s2s_tile(
                    pid_n, e, row0, end, K,
                    X, W, Y, A, Bm, XA_in, XA_out, Bias, ssi_ptr, offsets_ptr, K, N, R, E, FAN_OUT, M_BUCKET,
                    s_xm, s_xk, s_we, s_wk, s_wn, s_ym, s_yn, s_ae, s_ar, s_ak, s_be, s_bn, s_br, s_xam, s_xar, s_bias_e, s_bias_n,
                    scaling, Gates, Hin, DGP, s_hm, s_dgp, Wd, Xd, glu_alpha, glu_limit,
                    X_GROUPED, Y_GROUPED, LORA, WRITE_XA, HAS_BIAS, INT64, DOT_PREC, E_POW2, BLOCK_R, BLOCK_M, BLOCK_N, BLOCK_K,
                    GROUP_M, EVEN_K, EVEN_N, GLU_BWD, W_DESC, X_DESC, GLU_FWD, False,
                )
    elif WS:
        pid_m, pid_n = _swizzle(tl.program_id(0), tl.num_programs(0) // num_pid_n, num_pid_n, GROUP_M)
        # Warp-specialised (Triton's Hopper pass: one producer warp group issues the TMA loads, two consumer warp
        # groups split the tile's rows and run the wgmma and the epilogue). That pass compiles only a K loop that
        # is nested in no `if`, loads nothing through pointers and follows no tl.cumsum: so both operands through
        # TMA (grouped x, no fused LoRA: the launcher gives it the split epilogue), no half-height tail, the
        # prefix sum without a scan, and a program past the last row block runs a loop of no steps on no rows.
        e, row0, end = _locate_block_chunked(pid_m, offsets_ptr, E, BLOCK_M, E_POW2)
        live = e < E
        _s2s_tile(
            pid_n, tl.minimum(e, E - 1), row0, tl.where(live, end, row0), tl.where(live, K, 0),
            X, W, Y, A, Bm, XA_in, XA_out, Bias, ssi_ptr, offsets_ptr, K, N, R, E, FAN_OUT, M_BUCKET,
            s_xm, s_xk, s_we, s_wk, s_wn, s_ym, s_yn, s_ae, s_ar, s_ak, s_be, s_bn, s_br, s_xam, s_xar, s_bias_e, s_bias_n,
            scaling, Gates, Hin, DGP, s_hm, s_dgp, Wd, Xd, glu_alpha, glu_limit,
            X_GROUPED, Y_GROUPED, LORA, WRITE_XA, HAS_BIAS, INT64, DOT_PREC, E_POW2, BLOCK_R, BLOCK_M, BLOCK_N, BLOCK_K,
            GROUP_M, EVEN_K, EVEN_N, GLU_BWD, W_DESC, X_DESC, GLU_FWD, True,
        )
    else:
        pid_m, pid_n = _swizzle(tl.program_id(0), tl.num_programs(0) // num_pid_n, num_pid_n, GROUP_M)
        e, row0, end = locate_block(pid_m, offsets_ptr, E, BLOCK_M, E_POW2)
        if e < E:
            if HALF_TAIL and end - row0 <= BLOCK_M // 2:
                # an expert's last row block with at most half a tile of rows: a half-height tile (x through pointer
                # loads: the descriptor's box is BLOCK_M rows)
                _s2s_tile(
                    pid_n, e, row0, end, K,
                    X, W, Y, A, Bm, XA_in, XA_out, Bias, ssi_ptr, offsets_ptr, K, N, R, E, FAN_OUT, M_BUCKET,
                    s_xm, s_xk, s_we, s_wk, s_wn, s_ym, s_yn, s_ae, s_ar, s_ak, s_be, s_bn, s_br, s_xam, s_xar, s_bias_e, s_bias_n,
                    scaling, Gates, Hin, DGP, s_hm, s_dgp, Wd, Xd, glu_alpha, glu_limit,
                    X_GROUPED, Y_GROUPED, LORA, WRITE_XA, HAS_BIAS, INT64, DOT_PREC, E_POW2, BLOCK_R, BLOCK_M // 2, BLOCK_N, BLOCK_K,
                    GROUP_M, EVEN_K, EVEN_N, GLU_BWD, W_DESC, False, GLU_FWD, False,
                )
            else:
                _s2s_tile(
                    pid_n, e, row0, end, K,
                    X, W, Y, A, Bm, XA_in, XA_out, Bias, ssi_ptr, offsets_ptr, K, N, R, E, FAN_OUT, M_BUCKET,
                    s_xm, s_xk, s_we, s_wk, s_wn, s_ym, s_yn, s_ae, s_ar, s_ak, s_be, s_bn, s_br, s_xam, s_xar, s_bias_e, s_bias_n,
                    scaling, Gates, Hin, DGP, s_hm, s_dgp, Wd, Xd, glu_alpha, glu_limit,
                    X_GROUPED, Y_GROUPED, LORA, WRITE_XA, HAS_BIAS, INT64, DOT_PREC, E_POW2, BLOCK_R, BLOCK_M, BLOCK_N, BLOCK_K,
                    GROUP_M, EVEN_K, EVEN_N, GLU_BWD, W_DESC, X_DESC, GLU_FWD, False,
                )


@triton.jit
def _group_outer_kernel(
    Lp, Rp, Out, ssi_ptr, offsets_ptr,
    P, Q, E, M_BUCKET,
    s_lm, s_lp, s_rm, s_rq, s_oe, s_op, s_oq,
    L_FAN, R_FAN, scaling,
    L_GATHER: tl.constexpr, R_GATHER: tl.constexpr, INT64: tl.constexpr,
    COMPUTE: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    e = tl.program_id(0)
    pid_p = tl.program_id(1)
    pid_q = tl.program_id(2)
    end = tl.load(offsets_ptr + e).to(tl.int32)
    start = tl.load(offsets_ptr + e - 1, mask=e > 0, other=0).to(tl.int32)
    p_offs = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    q_offs = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_mask = p_offs < P
    q_mask = q_offs < Q
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        mm = rows < end
        rows, sidx = gather_index(ssi_ptr, rows, mm, INT64)
        if L_GATHER:
            l_rows = sidx // L_FAN
        else:
            l_rows = rows
        if R_GATHER:
            r_rows = sidx // R_FAN
        else:
            r_rows = rows
        lt = tl.load(Lp + l_rows[:, None] * s_lm + p_offs[None, :] * s_lp, mask=mm[:, None] & p_mask[None, :], other=0.0)
        rt = tl.load(Rp + r_rows[:, None] * s_rm + q_offs[None, :] * s_rq, mask=mm[:, None] & q_mask[None, :], other=0.0)
        acc += tl.dot(tl.trans(lt.to(COMPUTE)), rt.to(COMPUTE), input_precision=DOT_PREC)
    acc = acc * scaling
    e64 = e.to(tl.int64)
    tl.store(
        Out + e64 * s_oe + p_offs[:, None] * s_op + q_offs[None, :] * s_oq,
        acc.to(Out.dtype.element_ty),
        mask=p_mask[:, None] & q_mask[None, :],
    )


@triton.jit
def _combine_kernel(Y, G, Out, N, s_ym, s_yn, s_gt, s_gk, s_ot, s_on, TOP_K: tl.constexpr, BLOCK_N: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in range(TOP_K):
        g = tl.load(G + t * s_gt + j * s_gk).to(tl.float32)
        y = tl.load(Y + (t * TOP_K + j) * s_ym + n * s_yn, mask=nm, other=0.0).to(tl.float32)
        acc += g * y
    tl.store(Out + t * s_ot + n * s_on, acc.to(Out.dtype.element_ty), mask=nm)


@triton.jit
def _combine_bwd_kernel(
    Y, G, DO, DY, DG, N, s_ym, s_yn, s_gt, s_gk, s_dot, s_don, s_dym, s_dyn, s_dgt, s_dgk,
    TOP_K: tl.constexpr, NEED_DY: tl.constexpr, NEED_DG: tl.constexpr, BLOCK_N: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    for j in range(TOP_K):
        row = t * TOP_K + j
        g = tl.load(G + t * s_gt + j * s_gk).to(tl.float32)
        dg = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nm = n < N
            do = tl.load(DO + t * s_dot + n * s_don, mask=nm, other=0.0).to(tl.float32)
            if NEED_DY:
                tl.store(DY + row * s_dym + n * s_dyn, (g * do).to(DY.dtype.element_ty), mask=nm)
            if NEED_DG:
                dg += tl.load(Y + row * s_ym + n * s_yn, mask=nm, other=0.0).to(tl.float32) * do
        if NEED_DG:
            tl.store(DG + t * s_dgt + j * s_dgk, tl.sum(dg, 0).to(DG.dtype.element_ty))


@triton.jit
def _silu_glu_fwd_kernel(H, Out, I, s_hm, s_om, BLOCK: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cm = c < I
    g = tl.load(H + m * s_hm + c, mask=cm, other=0.0).to(tl.float32)
    u = tl.load(H + m * s_hm + I + c, mask=cm, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(Out + m * s_om + c, out.to(Out.dtype.element_ty), mask=cm)


@triton.jit
def _silu_glu_bwd_kernel(
    H, DO, DH, G, SSI, DGP, I, s_hm, s_dom, s_dhm, s_dgp,
    GATE: tl.constexpr, NEED_DG: tl.constexpr, BLOCK: tl.constexpr,
):
    """SiLU-GLU backward of ``DO`` against ``h`` (``silu_glu_bwd``). ``GATE`` (the light tail, ``silu_glu_gate_bwd``):
    ``DO`` holds ``d(act) / g`` (the down projection's dX fed the token gradient); per grouped row ``m`` (flat index
    ``f = ssi[m]``, routing weight ``g = G[f]``) first, with ``NEED_DG``, the routing weight's gradient
    ``<dout, y> = Σ act·DO`` (one fp32 partial per column block, ``act`` recomputed from ``h`` and rounded as the
    forward stored it), then the backward of ``g·DO``. ``G``/``SSI``/``DGP`` are not read without ``GATE``."""
    m = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cm = c < I
    g = tl.load(H + m * s_hm + c, mask=cm, other=0.0).to(tl.float32)
    u = tl.load(H + m * s_hm + I + c, mask=cm, other=0.0).to(tl.float32)
    do = tl.load(DO + m * s_dom + c, mask=cm, other=0.0).to(tl.float32)
    sg = tl.sigmoid(g)
    if GATE:
        f = tl.load(SSI + m).to(tl.int64)
        gw = tl.load(G + f).to(tl.float32)
        if NEED_DG:
            act = (g * sg * u).to(H.dtype.element_ty).to(tl.float32)  # as _silu_glu_fwd_kernel stored it
            tl.store(DGP + tl.program_id(1) * s_dgp + f, tl.sum(act * do, 0))
        do = do * gw
    dg = do * u * sg * (1.0 + g * (1.0 - sg))
    du = do * g * sg
    tl.store(DH + m * s_dhm + c, dg.to(DH.dtype.element_ty), mask=cm)
    tl.store(DH + m * s_dhm + I + c, du.to(DH.dtype.element_ty), mask=cm)


@triton.jit
def _clamped_glu_fwd_kernel(H, Out, I, s_hm, s_om, alpha, limit, BLOCK: tl.constexpr):
    """gpt-oss: interleaved columns (gate ``2i``, up ``2i+1``), ``(clamp(u) + 1) · g·sigmoid(alpha·g)`` with
    ``g = min(gate, limit)``, fp32 math."""
    m = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cm = c < I
    g = tl.load(H + m * s_hm + 2 * c, mask=cm, other=0.0).to(tl.float32)
    u = tl.load(H + m * s_hm + 2 * c + 1, mask=cm, other=0.0).to(tl.float32)
    g = tl.minimum(g, limit)
    u = tl.minimum(tl.maximum(u, -limit), limit)
    out = (u + 1.0) * (g * tl.sigmoid(alpha * g))
    tl.store(Out + m * s_om + c, out.to(Out.dtype.element_ty), mask=cm)


@triton.jit
def _clamped_glu_bwd_kernel(
    H, DO, DH, G, SSI, DGP, I, s_hm, s_dom, s_dhm, s_dgp, alpha, limit,
    GATE: tl.constexpr, NEED_DG: tl.constexpr, BLOCK: tl.constexpr,
):
    """Gradient of ``_clamped_glu_fwd_kernel``; clamps pass the gradient where ``min <= x <= max`` (torch's
    rule). One contiguous store of the interleaved (gate, up) gradients. ``GATE`` (the merged node's light tail,
    ``clamped_glu_gate_bwd``) as in ``_silu_glu_bwd_kernel``: ``DO`` holds ``d(act) / g``; per grouped row ``m`` (flat
    index ``f = ssi[m]``, routing weight ``G[f]``) first, with ``NEED_DG``, the fp32 partial ``Σ act·DO`` of this
    column block (``act`` recomputed, rounded as the forward stored it), then the backward of ``g·DO``."""
    m = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cm = c < I
    hg = tl.load(H + m * s_hm + 2 * c, mask=cm, other=0.0).to(tl.float32)
    hu = tl.load(H + m * s_hm + 2 * c + 1, mask=cm, other=0.0).to(tl.float32)
    do = tl.load(DO + m * s_dom + c, mask=cm, other=0.0).to(tl.float32)
    g = tl.minimum(hg, limit)
    u = tl.minimum(tl.maximum(hu, -limit), limit)
    sg = tl.sigmoid(alpha * g)
    if GATE:
        f = tl.load(SSI + m).to(tl.int64)
        gw = tl.load(G + f).to(tl.float32)
        if NEED_DG:
            act = ((u + 1.0) * (g * sg)).to(H.dtype.element_ty).to(tl.float32)  # as _clamped_glu_fwd_kernel stored it
            tl.store(DGP + tl.program_id(1) * s_dgp + f, tl.sum(act * do, 0))
        do = do * gw
    dg = do * (u + 1.0) * sg * (1.0 + alpha * g * (1.0 - sg))
    dg = tl.where(hg <= limit, dg, 0.0)
    du = tl.where((hu >= -limit) & (hu <= limit), do * g * sg, 0.0)
    ty = DH.dtype.element_ty
    c2 = tl.program_id(1) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(DH + m * s_dhm + c2, tl.interleave(dg.to(ty), du.to(ty)), mask=c2 < 2 * I)


@triton.jit
def _bias_dg_kernel(
    DO, Bias, EF, Out, T, Hd, E, s_dot, s_be, s_bh,
    TOP_K: tl.constexpr, E_POW2: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """``Out[t*k + j] = <DO[t], Bias[EF[t*k + j]]>`` in fp32 (``bias_dg``): per block of tokens the ``[BLOCK_T, E]``
    products ``DO·Biasᵀ`` (each ``DO`` row read once), then each flat row's expert column picked."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < T
    t64 = t.to(tl.int64)
    e = tl.arange(0, E_POW2)
    em = e < E
    acc = tl.zeros((BLOCK_T, E_POW2), dtype=tl.float32)
    for h0 in range(0, Hd, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        hm = hh < Hd
        d = tl.load(DO + t64[:, None] * s_dot + hh[None, :], mask=tm[:, None] & hm[None, :], other=0.0)
        b = tl.load(Bias + e[None, :] * s_be + hh[:, None] * s_bh, mask=em[None, :] & hm[:, None], other=0.0)
        acc += tl.dot(d, b.to(d.dtype), input_precision=DOT_PREC)
    for j in range(TOP_K):
        f = t64 * TOP_K + j
        ej = tl.load(EF + f, mask=tm, other=0)
        tl.store(Out + f, tl.sum(tl.where(e[None, :] == ej[:, None], acc, 0.0), 1), mask=tm)


if not INTERPRET:
    _s2s_tuned = triton.autotune(
        configs=_s2s_configs(),
        key=["M_BUCKET", "N", "K", "R", "X_GROUPED", "Y_GROUPED", "LORA", "INT64", "GLU_BWD"],
        prune_configs_by={"early_config_prune": _prune_s2s},
        do_bench=_bench,
    )(
        triton.heuristics(
            {"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0, "EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0}
        )(_s2s_kernel)
    )
    _outer_tuned = triton.autotune(
        configs=_outer_configs(),
        key=["M_BUCKET", "P", "Q", "L_GATHER", "R_GATHER", "INT64"],
        prune_configs_by={"early_config_prune": _prune_outer},
        do_bench=_bench,
    )(_group_outer_kernel)

#: Below this many routed rows a fixed configuration is used on the GPU (tuning tiny problems is waste).
AUTOTUNE_MIN_ROWS = 2048
_SMALL_S2S = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}
_SMALL_OUTER = {"BLOCK_M": 32, "BLOCK_P": 32, "BLOCK_Q": 64, "num_warps": 4, "num_stages": 3}

# The interpreter runs one fixed, small configuration (it cannot autotune, and small tiles keep it fast).
INTERP_S2S = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}
INTERP_OUTER = {"BLOCK_M": 32, "BLOCK_P": 64, "BLOCK_Q": 64}

# ------------------------------------------------------------------------------------------------
# tile choice on the GPU: deterministic by default
# ------------------------------------------------------------------------------------------------

#: ``"rule"`` (default): the same problem always gets the same tiles, from ``s2s_rule`` /
#: ``outer_rule`` (fitted to a sweep of every candidate tile of every launch of a block step at five
#: real MoE shapes on an H200, ``bench/tune_tiles.py``; results in ``bench/results/``), checked
#: against the device's shared memory and registers. Nothing is timed at run time, so a cold start
#: costs only the compiles (one configuration per launch kind) and repeated runs pick identical
#: kernels. ``"autotune"`` (``SCATTERMOE_TILES=autotune``): Triton's autotuner over the candidate
#: lists above, once per process and key (its pick can differ between runs when two candidates are
#: within timing noise; the sweep found several within 2%).
TILE_MODE = os.environ.get("SCATTERMOE_TILES", "rule")
#: ``{"s2s": cfg, "outer": cfg}``: force one configuration (tuning and benchmark scripts).
FORCE: dict = {}


def _cfg(bm, bn, bk, g, w, s):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g, "num_warps": w, "num_stages": s}


def s2s_rule(
    L: int, E: int, K: int, N: int, lora: int, grouped_in: bool = False, grouped_out: bool = False, glu: bool = False,
    tma: bool = False,
) -> list[dict]:
    """Candidate tiles for a scatter2scatter launch, best first (the first that fits the device is used).

    ``tma``: the device has TMA (Hopper class) and ``TMA_MODE`` allows it. Then a launch with at least
    160 rows per expert takes 128×256×64, 8 warps, 4 stages, with W (and grouped x) loaded through TMA
    descriptors: on an H200 (``bench/bench_gemm.py``, ``bench/results/h200-2026-12-01-tma*``) this was
    the fastest variant, or within noise of it, for all four launches at the four shapes with 256-1024
    rows per expert, 5-25% faster than the pointer-load tiles below (Mixtral's up projection 3.88 →
    3.03 ms, gpt-oss's down projection 0.74 → 0.60 ms), and the block step's GPU time fell 6-16%. At
    Qwen3.5's 128 rows per expert the launches gained only 1-4% and the host-bound block step measured
    slower (3.94 vs 3.12 ms synchronised, GPU time equal), so there the pointer-load tiles stay.

    Without TMA, from the H200 sweep (bf16, 128-4096 rows per expert): 128×128×64 tiles, 8 warps, 3
    stages won every launch except those reading sorted rows and writing a wide (≥ 2048) scattered
    output (the down projection's forward and the up projection's dX), where 128×256 was 10-25% faster;
    a rank-sized output (the split path's ``x·Aᵀ``) wants a thin, deep tile. Below ~96 rows per
    expert a 128-row block is mostly padding (blocks never straddle experts), so 64 rows (pointer
    loads: TMA was not measured there). The GLU-backward epilogue (``glu_down_dx``) holds h's two
    halves beside the accumulator: at 128×128 ptxas spills ~900 B per thread
    (``bench/sm90_compile_check.py``), at 128×64 it fits in 236 registers, so that launch takes 64
    columns."""
    if glu:
        return [_cfg(128, 64, 64, 8, 8, 3), _cfg(64, 64, 64, 8, 4, 3)]
    if N <= 32:
        bk = min(256, max(64, _next_pow2(K)))
        return [_cfg(64, max(16, _next_pow2(N)), bk, 8, 4, 3), _cfg(64, 16, 128, 8, 4, 3)]
    rows_per_expert = L / max(E, 1)
    if rows_per_expert < 96:
        return [_cfg(64, 128, 64, 8, 4, 4), _cfg(64, 64, 64, 8, 4, 3)]
    out = []
    if ws_applies(L, E, grouped_in, 0 if not glu else 1, tma):
        out.append(dict(WS_TILE))
    if tma and rows_per_expert >= 160:
        if PERSISTENT_MODE == "1" or (PERSISTENT_MODE == "rule" and RULE_PERSISTENT):
            # persistent: the flattened loop keeps the next tile's buffers beside this one's (4 stages would need
            # 237 KB of shared memory, over the 227 KB a block may have)
            out.append({**_cfg(128, 256, 64, 8, 8, 3), "TMA": True, "PERSISTENT": True})
        elif PERSISTENT_MODE == "noflat":
            out.append({**_cfg(128, 256, 64, 8, 8, 4), "TMA": True, "PERSISTENT": True, "FLATTEN": False})
        out.append({**_cfg(128, 256, 64, 8, 8, 4), "TMA": True})
    if grouped_in and not grouped_out and N >= 2048:
        out.append(_cfg(128, 256, 64, 8, 8, 3))
    out += [_cfg(128, 128, 64, 8, 8, 3), _cfg(64, 128, 64, 8, 4, 4), _cfg(64, 64, 64, 8, 4, 3)]
    if HALF_TAIL_MODE == "1" or (HALF_TAIL_MODE == "rule" and RULE_HALF_TAIL and rows_per_expert < 768):
        out = [{**c, "HALF_TAIL": True} if c["BLOCK_M"] == 128 else c for c in out]
    return out


def outer_rule(L: int, E: int, P: int, Q: int) -> list[dict]:
    """Candidate tiles for a group_outer launch (per-expert ``Lᵀ·R``), best first (same H200 sweep:
    within 3-6% of each launch's best on average)."""
    def c(bm, bp, bq, w, s):
        return {"BLOCK_M": bm, "BLOCK_P": bp, "BLOCK_Q": bq, "num_warps": w, "num_stages": s}

    if P <= 32:
        return [c(32, max(16, _next_pow2(P)), 128, 4, 4), c(32, 16, 64, 4, 3)]
    if Q <= 32:
        return [c(64, 128, max(16, _next_pow2(Q)), 4, 3), c(32, 64, 16, 4, 3)]
    return [c(64, 128, 128, 8, 3), c(64, 64, 64, 4, 3), c(32, 32, 64, 4, 3)]


#: TMA operand loads (Hopper's bulk tensor copy) in scatter2scatter: ``"rule"`` (default) where the tile
#: rule asks for them (``"TMA": True`` in its candidate), ``"1"`` wherever an operand's layout allows
#: (tests, benchmarks), ``"0"`` never. Env ``SCATTERMOE_TMA``.
TMA_MODE = os.environ.get("SCATTERMOE_TMA", "rule")

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - Triton < 3.4
    TensorDescriptor = None


@functools.lru_cache(maxsize=None)
def _tma_capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def use_tma(want: bool, x: torch.Tensor) -> bool:
    """Whether this launch builds TMA descriptors: asked for by the rule (or forced by ``TMA_MODE``), and a
    Hopper-class device (or the interpreter, which emulates descriptors)."""
    if TensorDescriptor is None or TMA_MODE == "0" or not (want or TMA_MODE == "1"):
        return False
    if INTERPRET or not x.is_cuda:
        return INTERPRET
    return _tma_capable(x.device.index if x.device.index is not None else torch.cuda.current_device())


#: Persistent grid for the TMA tiles (``_s2s_kernel``'s ``PERSISTENT``: one program per SM walks the output tiles in a
#: flattened loop, so a tile's epilogue overlaps the next tile's first loads): ``"rule"`` (default) where ``s2s_rule``
#: asks for it, ``"1"`` on every TMA tile, ``"noflat"`` on every TMA tile without flattening the tile loop into the K
#: loop (each tile pipelined on its own), ``"0"`` never. Env ``SCATTERMOE_PERSISTENT``; read by ``s2s_rule``, so a
#: script that changes it must clear ``_PICKED`` and ``_PLANS``.
PERSISTENT_MODE = os.environ.get("SCATTERMOE_PERSISTENT", "rule")
#: ``_s2s_kernel``'s ``HALF_TAIL``: an expert's last row block with at most ``BLOCK_M / 2`` rows runs as a half-height
#: tile (blocks never straddle experts, so at ~256 rows per expert a 128-row tile is ~20% padding). ``"rule"``
#: (default) where ``s2s_rule`` asks for it, ``"1"`` on every 128-row tile, ``"0"`` never. Env ``SCATTERMOE_HALF_TAIL``;
#: read by ``s2s_rule`` (clear ``_PICKED`` and ``_PLANS`` after changing it).
HALF_TAIL_MODE = os.environ.get("SCATTERMOE_HALF_TAIL", "rule")
#: What ``"rule"`` means for the two modes above (``bench/bench_gemm.py --persist`` and the block bench, H100,
#: ``bench/results/h100-2026-12-06-gemm1-*``): half-height tail tiles below 768 rows per expert (3-5% faster per
#: launch at 128-512 rows per expert, block GPU time 2.34 -> 2.26 ms at Qwen3-30B-A3B; +1.6% at Mixtral's 1024);
#: the persistent grid was slower in every block step (Qwen3-30B-A3B 2.34 -> 2.72 ms, Mixtral 10.43 -> 13.59), off.
#: Not flattened (``"noflat"``, H100, 2026-12-07 thirteenth session, ``bench/results/h100-2026-12-07-s13call1-*``): 5%
#: faster per launch at Mixtral's 1024 rows per expert, slower at 256-512, and slower in a block step at Mixtral whose
#: rows ran in a fixed order; not in the rule until an alternating block measurement shows a gain.
RULE_PERSISTENT = False
RULE_HALF_TAIL = True
#: Programs of a persistent launch under the interpreter (several, so the tile loop's stride is exercised).
INTERP_PROGRAMS = 3
#: Warp-specialised tiles (``_s2s_kernel``'s ``WS``; Triton's Hopper pass: a producer warp group issues the TMA loads,
#: two consumer warp groups share the 128×256 tile): ``"1"`` on the launches that allow it (see :func:`ws_applies`),
#: ``"0"`` (default) never. Env ``SCATTERMOE_WS``; read by ``s2s_rule`` (clear ``_PICKED`` and ``_PLANS`` after
#: changing it). ``"2"``: also the gathered-input launches, their rows gathered into sorted order first (one copy of
#: ``[L, K]``). Off by default; on a GPU it needs a Triton newer than 3.6 (:func:`_ws_pass_runs`).
WS_MODE = os.environ.get("SCATTERMOE_WS", "0")
_TRITON_VERSION = tuple(int(p) for p in re.findall(r"\d+", triton.__version__)[:2])
#: The warp-specialised tile: ``num_warps`` is the consumers' warp group; the pass adds the producer's and a second
#: consumer's (12 warps run). 3 stages: 4 would need 247 KB of shared memory (``bench/sm90_compile_check.py --ws``).
WS_TILE = {**_cfg(128, 256, 64, 8, 4, 3), "TMA": True, "WS": True}


def ws_applies(L: int, E: int, grouped_in: bool, gmode: int, tma: bool) -> bool:
    """Whether a launch takes the warp-specialised tile: ``WS_MODE`` on, a Triton whose pass runs it
    (:func:`_ws_pass_runs`), a Hopper-class device (``tma``), grouped input rows (TMA loads both operands: Triton
    3.6's pass compiles no pointer load in the K loop), the plain epilogue (``gmode == 0``) and the TMA tiles' ≥ 160
    rows per expert. Fused LoRA becomes the split epilogue there (``_s2s_launch``)."""
    return (WS_MODE in ("1", "2") and _ws_pass_runs() and tma and grouped_in and gmode == 0
            and L >= 160 * max(E, 1))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs_persistent(x: torch.Tensor) -> int:
    """Grid of a persistent launch: one program per SM (the TMA tiles' shared memory allows one per SM)."""
    if INTERPRET or not x.is_cuda:
        return INTERP_PROGRAMS
    return _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())


def _tma_ok(t: torch.Tensor, row_stride: int) -> bool:
    return t.data_ptr() % 16 == 0 and (row_stride * t.element_size()) % 16 == 0


def _tma_descs(x: torch.Tensor, W: torch.Tensor, cfg: dict, grouped_in: bool):
    """``(W_DESC, W descriptor, X_DESC, x descriptor)`` for one launch; a pointer stand-in (and flag 0)
    for an operand whose layout a descriptor cannot express (not contiguous in its last dimension,
    experts not back to back, rows not 16-byte aligned) or, for x, gathered rows.

    W ``[E, K, N]`` is described 2-D, expert e's rows at ``e*N`` (stored ``[N, K]``: ``W_DESC=1``) or
    ``e*K`` (stored ``[K, N]``: 2); grouped x ``[L, K]`` as itself."""
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    E, Kd, N = W.shape
    se, sk, sn = W.stride()
    w_desc, wd = 0, None
    if sk == 1 and (E == 1 or se == N * sn) and _tma_ok(W, sn):
        w_desc, wd = 1, TensorDescriptor(W, [E * N, Kd], [sn, 1], [bn, bk])
    elif sn == 1 and (E == 1 or se == Kd * sk) and _tma_ok(W, sk):
        w_desc, wd = 2, TensorDescriptor(W, [E * Kd, N], [sk, 1], [bk, bn])
    x_desc, xd = False, None
    if grouped_in and x.stride(1) == 1 and x.shape[0] > 0 and _tma_ok(x, x.stride(0)):
        x_desc, xd = True, TensorDescriptor(x, [x.shape[0], Kd], [x.stride(0), 1], [bm, bk])
    stand_in = x
    return w_desc, wd if wd is not None else stand_in, x_desc, xd if xd is not None else stand_in


_PICKED: dict = {}


def _as_config(d: dict):
    kw = {k: v for k, v in d.items() if k not in ("num_warps", "num_stages")}
    return triton.Config(kw, num_warps=d.get("num_warps", 4), num_stages=d.get("num_stages", 3))


def _config_dict(c) -> dict:
    return {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}


def pick_tiles(kind: str, key: tuple, candidates, named_args: dict) -> dict:
    """The configuration a launch uses in ``"rule"`` mode (cached per key): the first rule candidate
    that fits the device (pruned like the autotuner's candidates). ``candidates`` may be a callable
    returning the list, so that a cached key never rebuilds the rule's list (host time per launch)."""
    got = _PICKED.get((kind, key))
    if got is None:
        prune = _prune_s2s if kind == "s2s" else _prune_outer
        cands = candidates() if callable(candidates) else candidates
        kept = prune([_as_config(d) for d in cands], named_args)
        got = _PICKED[(kind, key)] = _config_dict(kept[0])
    return got


#: Launch plans (tile kwargs, constexpr flags, grid) per problem signature and picked tiles: everything in a launch
#: that depends only on shapes and flags is worked out once, so a repeated launch (every training step) costs a
#: dictionary lookup on the host. An entry is valid only while its tile pick is the one ``_PICKED`` holds (tuning
#: and benchmark scripts clear ``_PICKED`` to see the rule's pick again): callers treat an entry whose ``plan[0]`` is
#: not the current pick as a miss. Stored through ``store_bounded``.
_PLANS: dict = {}
_MAX_PLANS = 4096


def store_bounded(cache: dict, key, value, bound: int):
    """``cache[key] = value``, the dict emptied first when it already holds ``bound`` entries; returns ``value``. For
    the launch-plan caches here and in ``relayout`` / ``routing_kernels``: their keys hold token counts, which vary
    every step without packing, so an unbounded cache would grow without end. Callers look the cache up themselves
    (a hit must cost one dictionary lookup)."""
    if len(cache) >= bound:
        cache.clear()
    cache[key] = value
    return value


def _dot_prec(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------


def scatter2scatter(
    x: torch.Tensor,
    W: torch.Tensor,
    sorted_scattered_idxs: torch.Tensor,
    expert_offsets: torch.Tensor,
    fan_out: int,
    *,
    A: torch.Tensor | None = None,
    B: torch.Tensor | None = None,
    xa_in: torch.Tensor | None = None,
    scaling: float = 1.0,
    bias: torch.Tensor | None = None,
    grouped_in: bool = False,
    grouped_out: bool = False,
    write_xa: bool = False,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    act_out: torch.Tensor | None = None,
    act_clamp: tuple[float, float] | None = None,
):
    """``y = gather(x) W_e [+ s (x A_eᵀ) B_eᵀ] [+ b_e]`` scattered; returns ``(y, xa or None)``.

    ``A``+``B``: fused LoRA (``LORA=1``). ``xa_in``+``B``: split epilogue (``LORA=2``).
    ``write_xa`` also returns the grouped ``[L, r]`` fp32 rank intermediate.
    ``act_out`` (``[L, N/2]``, contiguous columns): the up projection of a SiLU-gated MLP (``y = [gate | up]``); the
    epilogue also writes ``act_out = silu(y[:, :N/2]) · y[:, N/2:]`` (rows ordered as ``y``'s), bitwise what
    ``silu_glu_fwd(y)`` computes from ``y`` (``GLU_FWD``: each program computes ``BLOCK_N/2`` gate columns and the
    matching up columns; see ``_s2s_tile``). With ``act_clamp = (alpha, limit)``: gpt-oss's interleaved layout (gate
    column ``2i``, up ``2i+1``) and clamped sigmoid-GLU instead, bitwise ``clamped_glu_fwd(y, alpha, limit)``
    (``GLU_FWD == 2``: the plain tiles, the epilogue splits each tile's column pairs).
    """
    glu = None
    if act_out is not None:
        L, N = sorted_scattered_idxs.numel(), W.shape[2]
        if N % 2 or act_out.shape != (L, N // 2) or (L and act_out.stride(1) != 1):
            raise ValueError(f"act_out must be [{L}, {N // 2}] with contiguous columns for W {tuple(W.shape)} "
                             f"(an even output width: gate | up), got {tuple(act_out.shape)}")
        glu = (None, act_out, 4) if act_clamp is None else ((float(act_clamp[0]), float(act_clamp[1])), act_out, 5)
    y, xa, _ = _s2s_launch(
        x, W, sorted_scattered_idxs, expert_offsets, fan_out, A, B, xa_in, scaling, bias,
        grouped_in, grouped_out, write_xa, out, out_dtype, glu,
    )
    return y, xa


def rank_xa(x, A, sorted_scattered_idxs, expert_offsets, fan_out, grouped_in):
    """Rank-r grouped GEMM ``x·A_eᵀ`` → grouped ``[L, r]`` fp32 (``A`` ``[E, r, K]``): the split LoRA path's first
    launch, whose result the base launch's epilogue reads as ``xa_in``."""
    xa, _ = scatter2scatter(x, A.transpose(1, 2), sorted_scattered_idxs, expert_offsets, fan_out,
                            grouped_in=grouped_in, grouped_out=True, out_dtype=torch.float32)
    return xa


def glu_down_dx(
    dout: torch.Tensor,
    Wt: torch.Tensor,
    sorted_scattered_idxs: torch.Tensor,
    expert_offsets: torch.Tensor,
    top_k: int,
    h: torch.Tensor | None,
    gates: torch.Tensor,
    *,
    A: torch.Tensor | None = None,
    B: torch.Tensor | None = None,
    xa_in: torch.Tensor | None = None,
    scaling: float = 1.0,
    write_xa: bool = False,
    glu: bool = True,
    need_dg: bool = True,
):
    """Backward of ``combine(silu_glu(h) · W_e (+ LoRA), gates)`` through the down projection in ONE launch.

    ``glu=False`` (the light tail of ``ops.glu_experts``): ``h`` is the saved activation ``act [L, I]`` (grouped, the
    down projection's input; ``None`` allowed when ``need_dg`` is off) and the epilogue only scales each row by its
    routing weight and (``need_dg``) reduces ``dg = Σ act·(dout·W_eᵀ…)``. Returns ``(d(act) [L, I] grouped,
    g·(dout·B_down) [L, r] fp32 or None (``write_xa``, fused LoRA only: the routing weight already applied),
    dgates [T, k] fp32 or None)``; the SiLU-GLU backward is left to ``silu_glu_bwd``. The launch keeps the rule's
    tiles (TMA on Hopper), unlike the GLU epilogue's narrow ones.

    ``dout [T, H]`` is the gradient of the combined output; rows are gathered per token (``ssi // k``),
    ``Wt`` is the down projection's ``[E, H, I]`` view (``W.transpose(1, 2)``), LoRA factors as for a dX
    launch (``A = B_downᵀ``, ``B = A_downᵀ``, or ``xa_in`` = ``dout·B_down`` for the split path).
    Returns ``(dh [L, 2I] grouped, dout·B_down [L, r] fp32 or None, dgates [T, k] fp32)``: the epilogue
    multiplies by each row's routing weight, applies the SiLU-GLU backward against ``h`` and reduces
    the routing weight's gradient ``Σ act·(dout·W_eᵀ…)`` (= ``<y, dout>``) per column block."""
    L, I = sorted_scattered_idxs.numel(), Wt.shape[2]
    if glu:
        mode = 1
        if h is None or h.stride(-1) != 1 or h.shape != (L, 2 * I):
            raise ValueError("glu_down_dx needs h [L, 2I] with contiguous columns")
    else:
        mode = 2 if need_dg else 3
        if need_dg and (h is None or h.stride(-1) != 1 or h.shape != (L, I)):
            raise ValueError("glu_down_dx(glu=False) needs the activation act [L, I] with contiguous columns")
        if xa_in is not None and write_xa:
            raise ValueError("glu_down_dx(glu=False): write_xa is for the fused LoRA path (xa_in given: scale it yourself)")
    if gates.numel() != L or not gates.is_contiguous():
        raise ValueError(f"glu_down_dx needs contiguous gates of {L} routing weights, got {tuple(gates.shape)}")
    dh, xa, dgp = _s2s_launch(
        dout, Wt, sorted_scattered_idxs, expert_offsets, top_k, A, B, xa_in, scaling, None,
        False, True, write_xa, None, None, (gates.reshape(-1), h if mode != 3 else None, mode),
    )
    return dh, xa, dgp.sum(0).view(-1, top_k) if dgp is not None else None


_DUMMIES: dict = {}


def _dummy(like: torch.Tensor, ndim: int) -> torch.Tensor:
    """A cached 1-element stand-in for an absent operand (never read: its constexpr flag is off)."""
    key = (like.device, like.dtype, ndim)
    t = _DUMMIES.get(key)
    if t is None:
        t = _DUMMIES[key] = torch.empty((1,) * ndim, device=like.device, dtype=like.dtype)
    return t


def _s2s_meta(L, E, R, lora, grouped_in, grouped_out, write_xa, bias, int64, dtype, has_glu) -> dict:
    """The constexpr flags of one scatter2scatter launch (besides its tiles); ``has_glu`` the epilogue mode
    (``GLU_BWD``: 0 plain store, 1 SiLU-GLU backward + gate + dg, 2 gate + dg against act, 3 gate only; 4: the
    forward SiLU-GLU of [gate | up] halves, ``GLU_FWD=1``; 5: gpt-oss's interleaved clamped GLU, ``GLU_FWD=2``)."""
    return dict(
        X_GROUPED=bool(grouped_in), Y_GROUPED=bool(grouped_out), LORA=lora, WRITE_XA=bool(write_xa and lora == 1),
        HAS_BIAS=bias is not None, INT64=int64, DOT_PREC=_dot_prec(dtype),
        E_POW2=expert_block(E), BLOCK_R=rank_block(R), GLU_BWD=int(has_glu) if has_glu < 4 else 0,
        GLU_FWD={4: 1, 5: 2}.get(has_glu, 0),
    )


def _s2s_plan(cfg, x, L, E, K, N, R, lora, grouped_in, grouped_out, write_xa, bias, int64, has_glu):
    """``(cfg, kernel kwargs, grid, use TMA descriptors, column blocks)`` of a launch with tiles ``cfg``.

    The forward SiLU-GLU epilogue (``has_glu == 4``): ``N`` is the gate width (half of W's) and the kernel's
    ``BLOCK_N`` half of the tile's (``cfg``'s ``BLOCK_N`` is the output columns one program computes, as for
    every launch, so the rule and the pruning see the real tile)."""
    tiles = dict(cfg)
    want_tma = tiles.pop("TMA", False)
    persistent = bool(tiles.pop("PERSISTENT", False))
    if has_glu == 4:
        tiles["BLOCK_N"] //= 2
    kw = _s2s_meta(L, E, R, lora, grouped_in, grouped_out, write_xa, bias, int64, x.dtype, has_glu)
    kw.update(tiles, EVEN_K=K % tiles["BLOCK_K"] == 0, EVEN_N=N % tiles["BLOCK_N"] == 0)
    ncol = _cdiv(N, tiles["BLOCK_N"])
    grid_ = (ncol * (_cdiv(L, tiles["BLOCK_M"]) + E), 1, 1)
    if persistent:
        kw["PERSISTENT"] = True
        grid_ = (min(grid_[0], num_programs_persistent(x)), 1, 1)
    return cfg, kw, grid_, bool(use_tma(want_tma, x) and not int64), ncol


def _ws_launch(x: torch.Tensor, L: int, E: int, grouped_in: bool, gmode: int) -> bool:
    """Whether this launch will get the warp-specialised tile (known before its tiles are looked up, since its fused
    LoRA must first become the split epilogue): the rule's choice (:func:`ws_applies`), or a forced / interpreter
    configuration with ``"WS"``; on the GPU only where it runs (:func:`_ws_runs`)."""
    if not grouped_in or gmode:
        return False
    if not x.is_cuda or INTERPRET:
        return bool(INTERP_S2S.get("WS"))
    if not _ws_runs(x):
        return False
    if "s2s" in FORCE:
        return bool(FORCE["s2s"].get("WS"))
    if L < AUTOTUNE_MIN_ROWS or TILE_MODE == "autotune":
        return False
    return ws_applies(L, E, grouped_in, gmode, True) and use_tma(True, x)


def _ws_pass_runs() -> bool:
    """Whether Triton's warp specialisation runs this tile here: under the interpreter, or a Triton newer than 3.9.
    No release up to 3.9 runs it on sm_90: under 3.6 every launch hung on an H100 (2026-12-07: its GPU test, the block
    bench's ``+ws`` rows and ``bench_gemm.py --ws``; ``bench/probe_ws.py`` hung on a plain GEMM with
    ``warp_specialize=True``); 3.9's pass rejects it when compiled for sm_90a (``bench/sm90_compile_check.py --ws``),
    and on an H100 a persistent form it does compile gave wrong results (``bench/probe_ws_grouped.py``, fourteenth
    session). So there ``SCATTERMOE_WS`` changes nothing."""
    return INTERPRET or _TRITON_VERSION > (3, 9)


def _ws_runs(x: torch.Tensor) -> bool:
    """Where the warp-specialised tile runs for this launch: where the pass runs (:func:`_ws_pass_runs`), and on a GPU
    only with 16-bit operands (Triton 3.6's pass fails on an fp32 dot)."""
    return _ws_pass_runs() and (INTERPRET or x.element_size() == 2)


def _ws_lora_descs(xa: torch.Tensor, B: torch.Tensor, R: int, kw: dict):
    """``(xa descriptor [L, R] fp32, B descriptor [E·R, N])`` for the warp-specialised tile's split epilogue, or None
    where a layout does not allow one (B not ``[E, N, R]`` with ``N`` contiguous and experts back to back, rows not
    16-byte aligned): that launch then runs the plain tile."""
    E, N, _ = B.shape
    se, sn, sr = B.stride()
    if sn != 1 or (E > 1 and se != R * sr) or not _tma_ok(B, sr) or xa.stride(1) != 1 or not _tma_ok(xa, xa.stride(0)):
        return None
    br = kw["BLOCK_R"]
    return (TensorDescriptor(xa, [xa.shape[0], R], [xa.stride(0), 1], [kw["BLOCK_M"], br]),
            TensorDescriptor(B, [E * R, N], [sr, 1], [br, kw["BLOCK_N"]]))


def _ws_kwargs(kw: dict, ws: bool) -> dict:
    """The launch's tile kwargs: a warp-specialised plan whose operands allow no descriptors runs the plain tile
    (8 warps: the 128×256 accumulator does not fit 4)."""
    return {**kw, "WS": False, "num_warps": 8} if kw.get("WS") and not ws else kw


def _s2s_launch(x, W, ssi, expert_offsets, fan_out, A, B, xa_in, scaling, bias, grouped_in, grouped_out, write_xa,
                out, out_dtype, glu):
    L = ssi.numel()
    E, K, N = W.shape
    if x.dim() != 2 or x.shape[-1] != K:
        raise ValueError(f"x must be [rows, {K}] for W {tuple(W.shape)}, got {tuple(x.shape)}")
    gmode = 0 if glu is None else glu[2]  # the epilogue mode (_s2s_meta's has_glu)
    if gmode == 1:
        out = torch.empty(L, 2 * N, device=x.device, dtype=glu[1].dtype)
    elif gmode in (2, 3):
        out = torch.empty(L, N, device=x.device, dtype=x.dtype)
    elif out is None:
        out = torch.empty(L, N, device=x.device, dtype=out_dtype or x.dtype)
    Nk = N // 2 if gmode == 4 else N  # the kernel's N: the gate width under the forward GLU epilogue
    if WS_MODE == "2" and not grouped_in and L and _ws_launch(x, L, E, True, gmode):
        # the warp-specialised tile reads x only through TMA: a gathered launch copies its rows into sorted order first
        x, fan_out, grouped_in = x.index_select(0, ssi // fan_out), 1, True
    lora = 0
    R = 0
    if B is not None:
        R = B.shape[-1]
        lora = 2 if xa_in is not None else 1
        if lora == 1 and A is None:
            raise ValueError("fused LoRA needs A")
        if lora == 1 and L and _ws_launch(x, L, E, grouped_in, gmode):
            # the warp-specialised tile takes LoRA only through its split epilogue: x·Aᵀ as its own rank GEMM first
            xa_in = rank_xa(x, A, ssi, expert_offsets, fan_out, grouped_in)
            lora = 2
    xa_out = None
    if lora and write_xa:
        xa_out = torch.empty(L, R, device=x.device, dtype=torch.float32)
    xa_buf = xa_in if lora == 2 else xa_out
    if lora == 2 and write_xa:
        xa_out = xa_in
        write_xa = False
    dummy = out
    Am = A if (A is not None and lora == 1) else _dummy(out, 3)
    Bm = B if B is not None else _dummy(out, 3)
    xab = xa_buf if xa_buf is not None else _dummy(out, 2)
    bb = bias if bias is not None else _dummy(out, 2)
    if L == 0:
        dgp = torch.zeros(1, 0, device=x.device, dtype=torch.float32) if gmode in (1, 2) else None
        return out, xa_out, dgp
    int64 = needs_int64(x, out, xab, glu[1] if gmode else None)
    cuda = x.is_cuda and not INTERPRET
    if cuda and "s2s" not in FORCE and L >= AUTOTUNE_MIN_ROWS and TILE_MODE != "autotune":
        # the default GPU path: rule tiles, launch plan cached per problem signature
        tma = gmode != 1 and not int64 and use_tma(True, x)
        gi, go = bool(grouped_in), bool(grouped_out)
        key = (K, N, lora, gi, go, m_bucket(L), E, gmode, tma)
        picked = _PICKED.get(("s2s", key))  # pick_tiles' own lookup, without building its arguments (host time)
        if picked is None:
            picked = pick_tiles(
                "s2s", key, lambda: s2s_rule(L, E, K, N, lora, gi, go, gmode == 1, tma),
                {"X": x, "N": N, "LORA": lora, "BLOCK_R": rank_block(R)},
            )
        pkey = (key, L, R, bool(write_xa), bias is not None, int64, x.dtype, TMA_MODE)
        plan = _PLANS.get(pkey)
        if plan is None or plan[0] is not picked:
            built = _s2s_plan(picked, x, L, E, K, Nk, R, lora, gi, go, write_xa, bias, int64, gmode)
            plan = store_bounded(_PLANS, pkey, (*built, {}), _MAX_PLANS)
        _, kw, grid_, use_desc, ncol, slots = plan
    else:
        if not cuda:
            cfg = INTERP_S2S
        elif "s2s" in FORCE:
            cfg = FORCE["s2s"]
        elif L < AUTOTUNE_MIN_ROWS:
            cfg = _SMALL_S2S
        else:  # TILE_MODE == "autotune"
            cfg = None if not gmode else pick_tiles(
                "s2s", (K, N, lora, bool(grouped_in), bool(grouped_out), m_bucket(L), E, gmode, False),
                lambda: s2s_rule(L, E, K, N, lora, grouped_in, grouped_out, gmode == 1, False),
                {"X": x, "N": N, "LORA": lora, "BLOCK_R": rank_block(R)},
            )
        slots = None
        if cfg is None:
            kw, grid_, use_desc, ncol = None, None, False, 0
        else:
            _, kw, grid_, use_desc, ncol = _s2s_plan(
                cfg, x, L, E, K, Nk, R, lora, grouped_in, grouped_out, write_xa, bias, int64, gmode
            )
    glu_al = (0.0, 0.0)  # the clamped GLU's alpha and limit (GLU_FWD == 2 only)
    if gmode >= 4:  # the forward GLU epilogue: act written through Hin
        dgp = None
        gb = dgb = dummy
        hb, s_hm, s_dgp = glu[1], glu[1].stride(0), 0
        if gmode == 5:
            glu_al = glu[0]
    elif gmode:
        gates, h = glu[0], glu[1]
        dgp = torch.empty(ncol, L, device=x.device, dtype=torch.float32) if gmode != 3 else None
        gb, hb, dgb = gates, h if h is not None else dummy, dgp if dgp is not None else dummy
        s_hm, s_dgp = (h.stride(0) if h is not None else 0), (dgp.stride(0) if dgp is not None else 0)
    else:
        dgp = None
        gb = hb = dgb = dummy
        s_hm = s_dgp = 0
    args = (
        x, W, out, Am, Bm, xab, xab, bb, ssi, expert_offsets,
        K, Nk, R, E, fan_out, m_bucket(L),
        *x.stride(), *W.stride(), *out.stride(),  # x, out, xab, bias 2-D; W, A, B 3-D (one call each: host time)
        *Am.stride(), *Bm.stride(), *xab.stride(), *bb.stride(),
        float(scaling), gb, hb, dgb, s_hm, s_dgp,
    )
    if kw is None:
        meta = _s2s_meta(L, E, R, lora, grouped_in, grouped_out, write_xa, bias, int64, x.dtype, gmode)

        def grid(META):
            return (_cdiv(N, META["BLOCK_N"]) * (_cdiv(L, META["BLOCK_M"]) + E),)

        _s2s_tuned[grid](*args, dummy, dummy, *glu_al, **meta)
    else:
        w_desc, wd, x_desc, xd = 0, dummy, False, dummy
        if use_desc:
            w_desc, wd, x_desc, xd = _tma_descs(x, W, kw, grouped_in)
        ws = False
        if kw.get("WS"):
            lora_descs = _ws_lora_descs(xab, Bm, R, kw) if lora == 2 else ()
            ws = bool(w_desc and x_desc and lora_descs is not None and lora != 1 and gmode == 0 and _ws_runs(x))
            if ws and lora == 2:
                args = (*args[:4], lora_descs[1], lora_descs[0], *args[6:])  # Bm, XA_in as descriptors
        if slots is None:
            _s2s_kernel[grid_](*args, wd, xd, *glu_al, **_ws_kwargs(kw, ws), W_DESC=w_desc, X_DESC=x_desc)
        else:
            # repeated launches of a cached plan skip Triton's argument binding (launch.py)
            got = slots.get((w_desc, x_desc, ws))
            if got is None:
                got = slots[(w_desc, x_desc, ws)] = ({**_ws_kwargs(kw, ws), "W_DESC": w_desc, "X_DESC": x_desc}, {})
            _launch(_s2s_kernel, grid_, (*args, wd, xd, *glu_al), got[0], got[1])
    return out, xa_out, dgp


def group_outer(
    Lmat: torch.Tensor,
    Rmat: torch.Tensor,
    sorted_scattered_idxs: torch.Tensor,
    expert_offsets: torch.Tensor,
    *,
    l_fan: int = 0,
    r_fan: int = 0,
    scaling: float = 1.0,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``out[e] = scaling · Σ_{rows of e} L[row]ᵀ R[row]`` → ``[E, P, Q]``.

    ``l_fan``/``r_fan`` = 0: the operand is grouped (row = sorted position); ``f > 0``: gathered,
    row = ``ssi[p] // f``. Experts without rows get zeros.
    """
    E = expert_offsets.numel()
    P, Q = Lmat.shape[1], Rmat.shape[1]
    if out is None:
        out = torch.empty(E, P, Q, device=Rmat.device, dtype=out_dtype or Rmat.dtype)
    if compute_dtype is None:
        compute_dtype = Rmat.dtype if Rmat.dtype != torch.float32 else Lmat.dtype
    L = sorted_scattered_idxs.numel()
    int64 = needs_int64(Lmat, Rmat)
    args = (
        Lmat, Rmat, out, sorted_scattered_idxs, expert_offsets,
        P, Q, E, m_bucket(L),
        *Lmat.stride(), *Rmat.stride(), *out.stride(),  # 2-D, 2-D, 3-D
        max(l_fan, 1), max(r_fan, 1), float(scaling),
    )
    cuda = Rmat.is_cuda and not INTERPRET
    if cuda and "outer" not in FORCE and L >= AUTOTUNE_MIN_ROWS and TILE_MODE != "autotune":
        # the default GPU path: rule tiles, launch plan cached per problem signature (see _PLANS)
        key = (P, Q, l_fan > 0, r_fan > 0, m_bucket(L), E)
        picked = _PICKED.get(("outer", key))  # pick_tiles' own lookup, without building its arguments (host time)
        if picked is None:
            picked = pick_tiles("outer", key, lambda: outer_rule(L, E, P, Q), {"Rp": Rmat, "P": P, "Q": Q})
        pkey = ("outer", key, int64, compute_dtype)
        plan = _PLANS.get(pkey)
        if plan is None or plan[0] is not picked:
            plan = store_bounded(_PLANS, pkey, (picked, {**_outer_meta(l_fan, r_fan, int64, compute_dtype), **picked},
                                                (E, _cdiv(P, picked["BLOCK_P"]), _cdiv(Q, picked["BLOCK_Q"])), {}),
                                 _MAX_PLANS)
        _, kw, grid_, slot = plan
        _launch(_group_outer_kernel, grid_, args, kw, slot)
        return out
    meta = _outer_meta(l_fan, r_fan, int64, compute_dtype)

    def grid(META):
        return (E, _cdiv(P, META["BLOCK_P"]), _cdiv(Q, META["BLOCK_Q"]))

    if not cuda:
        _group_outer_kernel[grid](*args, **meta, **INTERP_OUTER)
    elif "outer" in FORCE:
        _group_outer_kernel[grid](*args, **meta, **FORCE["outer"])
    elif L < AUTOTUNE_MIN_ROWS:
        _group_outer_kernel[grid](*args, **meta, **_SMALL_OUTER)
    else:  # TILE_MODE == "autotune"
        _outer_tuned[grid](*args, **meta)
    return out


def _outer_meta(l_fan, r_fan, int64, compute_dtype) -> dict:
    """The constexpr flags of one group_outer launch (besides its tiles)."""
    return dict(
        L_GATHER=l_fan > 0, R_GATHER=r_fan > 0, INT64=int64, COMPUTE=_tl_dtype(compute_dtype),
        DOT_PREC=_dot_prec(compute_dtype),
    )


_SMALL_SLOTS: dict = {}


def _launch_small(kernel, grid, args, **kw):
    """``kernel[grid](*args, **kw)`` for the elementwise kernels, through ``launch.py``'s direct path on repeats
    (one slot per kernel and constexpr values; ``grid`` a 3-tuple)."""
    skey = (kernel, *kw.values())
    slot = _SMALL_SLOTS.get(skey)
    if slot is None:
        slot = _SMALL_SLOTS[skey] = {}
    _launch(kernel, grid, args, kw, slot)


def combine(y: torch.Tensor, gates: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``out[t] = Σ_j gates[t, j] · y[t*k + j]`` (no autograd; see ``ops.combine``)."""
    T, k = gates.shape
    N = y.shape[1]
    out = torch.empty(T, N, device=y.device, dtype=out_dtype or y.dtype)
    if T == 0:
        return out
    BLOCK_N = min(1024, _next_pow2(N)) if not INTERPRET else min(64, _next_pow2(N))
    _launch_small(
        _combine_kernel, (T, _cdiv(N, BLOCK_N), 1),
        (y, gates, out, N, y.stride(0), y.stride(1), gates.stride(0), gates.stride(1), out.stride(0), out.stride(1)),
        TOP_K=k, BLOCK_N=BLOCK_N,
    )
    return out


def combine_bwd(y, gates, dout, need_dy: bool = True, need_dg: bool = True):
    """Gradients of :func:`combine` in one pass: ``dy[t*k+j] = g[t,j]·dout[t]`` (dout's dtype) and
    ``dg[t,j] = y[t*k+j]·dout[t]`` (fp32 accumulation, gates' dtype). Returns ``(dy, dg)``."""
    T, k = gates.shape
    N = y.shape[1]
    dy = torch.empty(T * k, N, device=y.device, dtype=dout.dtype) if need_dy else None
    dg = torch.empty(T, k, device=y.device, dtype=gates.dtype) if need_dg else None
    if T == 0:
        return dy, dg
    dyb = dy if dy is not None else dout
    dgb = dg if dg is not None else gates
    BLOCK_N = min(64 if INTERPRET else 1024, _next_pow2(N))
    _launch_small(
        _combine_bwd_kernel, (T, 1, 1),
        (y, gates, dout, dyb, dgb, N, y.stride(0), y.stride(1), gates.stride(0), gates.stride(1),
         dout.stride(0), dout.stride(1), dyb.stride(0), dyb.stride(1), dgb.stride(0), dgb.stride(1)),
        TOP_K=k, NEED_DY=need_dy, NEED_DG=need_dg, BLOCK_N=BLOCK_N,
    )
    return dy, dg


def _glu_block(I: int) -> int:
    return min(64 if INTERPRET else 1024, _next_pow2(max(I, 1)))


def silu_glu_fwd(h: torch.Tensor) -> torch.Tensor:
    """``silu(h[:, :I]) * h[:, I:]`` for ``h`` ``[M, 2I]`` (concatenated gate/up), fp32 math."""
    M, I2 = h.shape
    I = I2 // 2
    out = torch.empty(M, I, device=h.device, dtype=h.dtype)
    if M:
        BLOCK = _glu_block(I)
        _launch_small(_silu_glu_fwd_kernel, (M, _cdiv(I, BLOCK), 1), (h, out, I, h.stride(0), out.stride(0)), BLOCK=BLOCK)
    return out


def silu_glu_bwd(h: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`silu_glu_fwd` w.r.t. ``h``."""
    M, I2 = h.shape
    I = I2 // 2
    dh = torch.empty_like(h)
    if M:
        BLOCK = _glu_block(I)
        _launch_small(
            _silu_glu_bwd_kernel, (M, _cdiv(I, BLOCK), 1),
            (h, dout, dh, dh, dh, dh, I, h.stride(0), dout.stride(0), dh.stride(0), 0), GATE=False, NEED_DG=False,
            BLOCK=BLOCK,
        )
    return dh


def silu_glu_gate_bwd(h: torch.Tensor, dacc: torch.Tensor, gates: torch.Tensor, ssi: torch.Tensor, need_dg: bool = True,
                      dg_add: torch.Tensor | None = None):
    """Backward of ``combine(silu_glu(h) · W_e …, gates)`` between the down projection's dX and the up projection (the
    merged node's light tail): ``dacc [L, I]`` grouped is ``d(act) / g`` (the dX launch fed the token gradient, so the
    routing weight is applied here, in fp32), ``h [L, 2I]`` grouped, ``gates [T, k]`` contiguous, ``ssi`` the sorted
    rows' flat indices. Returns ``(dh [L, 2I], dgates [T, k] fp32 or None)``; ``dgates = Σ act·dacc`` per row (fp32
    partials per column block, summed once: deterministic), plus ``dg_add`` (flat ``[T*k]`` fp32, e.g. the down
    bias's term from :func:`bias_dg`) when given."""
    return _glu_gate_bwd(_silu_glu_bwd_kernel, (), "silu_glu_gate_bwd", h, dacc, gates, ssi, need_dg, dg_add)


def clamped_glu_gate_bwd(h: torch.Tensor, dacc: torch.Tensor, gates: torch.Tensor, ssi: torch.Tensor, alpha: float,
                         limit: float, need_dg: bool = True, dg_add: torch.Tensor | None = None):
    """:func:`silu_glu_gate_bwd` for gpt-oss's interleaved clamped sigmoid-GLU (``_clamped_glu_bwd_kernel`` with
    ``GATE``): same arguments and returns, ``h [L, 2I]`` interleaved (gate ``2i``, up ``2i+1``)."""
    return _glu_gate_bwd(_clamped_glu_bwd_kernel, (float(alpha), float(limit)), "clamped_glu_gate_bwd", h, dacc, gates,
                         ssi, need_dg, dg_add)


def _glu_gate_bwd(kernel, act_args, name, h, dacc, gates, ssi, need_dg, dg_add):
    M, I2 = h.shape
    I = I2 // 2
    if dacc.shape != (M, I) or h.stride(-1) != 1 or dacc.stride(-1) != 1:
        raise ValueError(f"{name} needs h [L, 2I] and dacc [L, I] with contiguous columns, got "
                         f"{tuple(h.shape)} and {tuple(dacc.shape)}")
    if gates.numel() != M or not gates.is_contiguous():
        raise ValueError(f"{name} needs contiguous gates of {M} routing weights, got {tuple(gates.shape)}")
    dh = torch.empty_like(h)
    BLOCK = _glu_block(I)
    ncol = _cdiv(I, BLOCK)
    dgp = torch.empty(ncol, M, device=h.device, dtype=torch.float32) if need_dg else None
    if M:
        dgb = dgp if dgp is not None else dh
        _launch_small(
            kernel, (M, ncol, 1),
            (h, dacc, dh, gates, ssi, dgb, I, h.stride(0), dacc.stride(0), dh.stride(0), dgb.stride(0), *act_args),
            GATE=True, NEED_DG=bool(need_dg), BLOCK=BLOCK,
        )
    if dgp is None:
        return dh, None
    dg = dgp.sum(0)
    if dg_add is not None:
        dg += dg_add
    return dh, dg.view(gates.shape)


def flat_experts(sei: torch.Tensor, ssi: torch.Tensor) -> torch.Tensor:
    """Each flat row's expert (``top_k_index`` flattened) from the sorted routing: ``out[ssi[m]] = sei[m]``."""
    return torch.empty_like(sei).index_copy_(0, ssi, sei)


def bias_dg(dout: torch.Tensor, bias: torch.Tensor, ef: torch.Tensor, top_k: int) -> torch.Tensor:
    """The down bias's share of the routing weights' gradient: ``out[t*k + j] = <dout[t], bias[ef[t*k + j]]>`` (fp32
    ``[T*k]``; ``dout [T, H]`` with contiguous columns, ``bias [E, H]``, ``ef`` each flat row's expert, see
    :func:`flat_experts`). One small launch that reads ``dout`` once (the light tail keeps no ``y = act·W + b``)."""
    T, Hd = dout.shape
    E = bias.shape[0]
    out = torch.empty(T * top_k, device=dout.device, dtype=torch.float32)
    if dout.stride(-1) != 1:
        raise ValueError("bias_dg needs dout with contiguous columns")
    if T:
        BLOCK_T = 16 if INTERPRET else 32
        BLOCK_H = min(64, max(16, _next_pow2(Hd)))
        _launch_small(
            _bias_dg_kernel, (_cdiv(T, BLOCK_T), 1, 1),
            (dout, bias, ef, out, T, Hd, E, dout.stride(0), bias.stride(0), bias.stride(1)),
            TOP_K=int(top_k), E_POW2=max(16, _next_pow2(E)), DOT_PREC=_dot_prec(dout.dtype), BLOCK_T=BLOCK_T,
            BLOCK_H=BLOCK_H,
        )
    return out


def clamped_glu_fwd(h: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's clamped sigmoid-GLU of ``h`` ``[M, 2I]`` (interleaved gate/up columns) → ``[M, I]``, fp32 math."""
    M, I2 = h.shape
    I = I2 // 2
    out = torch.empty(M, I, device=h.device, dtype=h.dtype)
    if M:
        BLOCK = _glu_block(I)
        _launch_small(
            _clamped_glu_fwd_kernel, (M, _cdiv(I, BLOCK), 1),
            (h, out, I, h.stride(0), out.stride(0), float(alpha), float(limit)), BLOCK=BLOCK,
        )
    return out


def clamped_glu_bwd(h: torch.Tensor, dout: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """Gradient of :func:`clamped_glu_fwd` w.r.t. ``h``."""
    M, I2 = h.shape
    I = I2 // 2
    dh = torch.empty(M, I2, device=h.device, dtype=h.dtype)
    if M:
        BLOCK = _glu_block(I)
        _launch_small(
            _clamped_glu_bwd_kernel, (M, _cdiv(I, BLOCK), 1),
            (h, dout, dh, dh, dh, dh, I, h.stride(0), dout.stride(0), dh.stride(0), 0, float(alpha), float(limit)),
            GATE=False, NEED_DG=False, BLOCK=BLOCK,
        )
    return dh
