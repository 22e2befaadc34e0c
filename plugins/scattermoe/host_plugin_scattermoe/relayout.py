"""The LoRA factors' cast and re-layout as one autograd node with a tiled Triton transpose (issue 16).

peft keeps ``lora_B`` as ``[out, r·E]``, rank-major: the kernel view ``B [E, out, r]`` is a permute with ``E``
innermost (``lora.peft_factors``), while the kernels read ``B`` contiguous along ``out``. Every experts call
therefore re-lays ``B`` out (and casts it, when peft keeps fp32 factors on a bf16 model), and the backward writes
``dB`` back into the parameter's layout. Done by torch, these are strided elementwise copies (``aten.clone`` in
``kernel_lora`` forward, ``aten.clone`` of a reshape in the autograd engine backward) that run far below bandwidth
(~23 µs each for 3-4 M elements on an H200). Here:

* :func:`tiled_copy_` copies (and casts) between two layouts of one tensor where the source is contiguous along one
  dimension and the destination along another: ``[BLOCK_I, BLOCK_J]`` tiles loaded coalesced along the source's
  contiguous dimension, ``tl.trans``, stored coalesced along the destination's (``_tiled_copy_kernel``), masks for
  any size, int64 offsets past ``2**31``, launched through ``launch.py``'s direct path on repeats. Dimensions that
  are contiguous together in both layouts are merged first, so ``dB [E, out, r]`` → ``[out, r, E]`` is one 2-D
  transpose and ``B [E, out, r]`` (``E`` innermost) → ``[E, r, out]`` a batch of ``r`` 2-D transposes.
* :class:`LoraLayoutFunction` (``ops.kernel_lora``, the separate nodes) and :func:`prepare` / :func:`grads` (the
  merged node ``ops._GluExpertsFunction``, which runs them inside its own forward/backward): forward ``A`` cast
  when its dtype differs (a contiguous cast, torch's), ``B`` through the tiled kernel into the kernel layout;
  backward ``dA`` cast back, ``dB`` written straight into the parameter's own layout and dtype, so the engine's
  view backwards are free and AccumulateGrad takes the tensor as it is (no clone).

It is a copy and a cast: values and gradients are bitwise those of the torch path (round to nearest even, as
torch's cast). The torch code stays where neither tensor is on CUDA (and not under ``TRITON_INTERPRET=1``), and
for any layout that is not such a transpose. ``SCATTERMOE_TILED_RELAYOUT=0`` restores the torch path everywhere
(before/after measurements).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from host_plugin_scattermoe import kernels as K

ENABLED = os.environ.get("SCATTERMOE_TILED_RELAYOUT", "1") != "0"


@triton.jit
def _tiled_copy_kernel(
    Src, Dst, NI, NJ, n_tj, n_ti, s_sb, s_si, s_db, s_dj,
    INT64: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """``dst[b, i, j] = src[b, i, j]`` (cast to dst's dtype); ``src`` contiguous along ``j``, ``dst`` along ``i``.
    One program per ``[BLOCK_I, BLOCK_J]`` tile, ``j`` tiles fastest; ``b`` = batch index."""
    pid = tl.program_id(0)
    pj = pid % n_tj
    rest = pid // n_tj
    pi = rest % n_ti
    b = rest // n_ti
    i = pi * BLOCK_I + tl.arange(0, BLOCK_I)
    j = pj * BLOCK_J + tl.arange(0, BLOCK_J)
    if INT64:
        i = i.to(tl.int64)
        j = j.to(tl.int64)
        b = b.to(tl.int64)
    im = i < NI
    jm = j < NJ
    t = tl.load(Src + b * s_sb + i[:, None] * s_si + j[None, :], mask=im[:, None] & jm[None, :])
    t = tl.trans(t.to(Dst.dtype.element_ty))  # [BLOCK_J, BLOCK_I]
    tl.store(Dst + b * s_db + j[:, None] * s_dj + i[None, :], t, mask=jm[:, None] & im[None, :])


def transpose_plan(shape, src_strides, dst_strides):
    """``(NB, NI, NJ, s_sb, s_si, d_db, d_dj)`` of a copy between two layouts of one tensor that
    ``_tiled_copy_kernel`` runs (source contiguous along ``j``, destination along ``i``, at most one more dimension
    as the batch), after dropping size-1 dimensions and merging neighbours contiguous together in both layouts;
    ``None`` when the copy is not such a transpose (e.g. both contiguous along the same dimension: a plain copy)."""
    dims = [(n, s, d) for n, s, d in zip(shape, src_strides, dst_strides) if n != 1]
    merged: list = []
    for n, s, d in dims:
        if merged:
            n0, s0, d0 = merged[-1]
            if s0 == n * s and d0 == n * d:
                merged[-1] = (n0 * n, s, d)
                continue
        merged.append((n, s, d))
    if len(merged) > 3:
        return None
    j = next((x for x, (_, s, _) in enumerate(merged) if s == 1), None)
    i = next((x for x, (_, _, d) in enumerate(merged) if d == 1), None)
    if i is None or j is None or i == j:
        return None
    rest = [x for x in range(len(merged)) if x not in (i, j)]
    nb, sb, db = merged[rest[0]] if rest else (1, 0, 0)
    return nb, merged[i][0], merged[j][0], sb, merged[i][1], db, merged[j][2]


def _block(n: int) -> int:
    return max(16, min(32 if K.INTERPRET else 64, K._next_pow2(n)))


#: launch plans of tiled_copy_ by (shape, strides, dtypes): a repeat costs one lookup (host time); cleared when full
_PLANS: dict = {}


def tiled_copy_(dst: torch.Tensor, src: torch.Tensor) -> bool:
    """``dst.copy_(src)`` through ``_tiled_copy_kernel`` when the two layouts make it a transpose (see
    :func:`transpose_plan`) and the tensors are where Triton runs; returns False (nothing written) otherwise."""
    key = (src.shape, src.stride(), dst.shape, dst.stride(), src.dtype, dst.dtype)
    plan = _PLANS.get(key)
    if plan is None:
        plan = K.store_bounded(_PLANS, key, _plan_copy(dst, src), 256)
    if plan is False or dst.device != src.device or not (dst.is_cuda or K.INTERPRET):
        return False
    if plan is True:  # nothing to copy
        return True
    grid, scalars, kw = plan
    K._launch_small(_tiled_copy_kernel, grid, (src, dst, *scalars), **kw)
    return True


def _plan_copy(dst: torch.Tensor, src: torch.Tensor):
    """``(grid, scalar args, constexprs)`` of the copy, True when it is empty, False when the kernel does not apply."""
    if dst.shape != src.shape or dst.dtype not in K._TL_DTYPES or src.dtype not in K._TL_DTYPES:
        return False
    if K.INTERPRET and dst.dtype == torch.bfloat16 and src.dtype != torch.bfloat16:
        return False  # the interpreter truncates to bf16 (the GPU and torch round to nearest even): torch's copy
    if dst.numel() == 0:
        return True
    plan = transpose_plan(src.shape, src.stride(), dst.stride())
    if plan is None:
        return False
    nb, ni, nj, s_sb, s_si, d_db, d_dj = plan
    bi, bj = _block(ni), _block(nj)
    n_ti, n_tj = K._cdiv(ni, bi), K._cdiv(nj, bj)
    kw = dict(INT64=K.needs_int64(src, dst), BLOCK_I=bi, BLOCK_J=bj, num_warps=4)
    return (nb * n_ti * n_tj, 1, 1), (ni, nj, n_tj, n_ti, s_sb, s_si, d_db, d_dj), kw


def applies(t: torch.Tensor) -> bool:
    """The tiled path is on (``SCATTERMOE_TILED_RELAYOUT``) and ``t`` is where Triton runs."""
    return ENABLED and (t.is_cuda or K.INTERPRET)


def _dense(shape, strides) -> bool:
    """The strides describe a non-overlapping, dense layout (a permutation of a contiguous one)."""
    expect = 1
    for n, st in sorted(zip(shape, strides), key=lambda p: (p[1], p[0])):
        if n == 1:
            continue
        if st != expect:
            return False
        expect *= n
    return True


def _contiguous(shape, strides) -> bool:
    expect = 1
    for n, st in zip(reversed(shape), reversed(strides)):
        if n != 1 and st != expect:
            return False
        expect *= n
    return True


def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    if not tiled_copy_(dst, src):
        dst.copy_(src)
    return dst


def kernel_B(B: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``B [E, out, r]`` in ``dtype``, contiguous along ``out`` (memory ``[E, r, out]``); ``B`` itself when it
    already is."""
    if B.dtype == dtype and B.transpose(1, 2).is_contiguous():
        return B
    E, N, r = B.shape
    out = torch.empty(E, r, N, device=B.device, dtype=dtype).transpose(1, 2)
    return _copy_into(out, B)


def kernel_A(A: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``A [E, r, in]`` in ``dtype``, contiguous (a cast only when the dtype differs; torch's contiguous cast)."""
    if A.dtype == dtype and A.is_contiguous():
        return A
    return A.to(dtype, memory_format=torch.contiguous_format).contiguous()


def ready(A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype) -> bool:
    """Both factors already in the kernels' dtype and layout (nothing to copy)."""
    return A.dtype == B.dtype == dtype and A.is_contiguous() and B.transpose(1, 2).is_contiguous()


def prepare(A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype):
    """``(A_k, B_k, meta)``: the factors in the kernels' dtype and layout, and what :func:`grads` needs."""
    return kernel_A(A, dtype), kernel_B(B, dtype), (A.dtype, B.dtype, B.shape, B.stride())


def grad_like(g: torch.Tensor | None, dtype: torch.dtype, shape, strides) -> torch.Tensor | None:
    """``g`` in ``dtype`` and in the layout ``strides`` (a parameter's, when dense; contiguous otherwise)."""
    if g is None:
        return None
    strides = tuple(strides)
    if not _dense(shape, strides):
        strides, n = [], 1
        for size in reversed(shape):  # contiguous
            strides.insert(0, n)
            n *= size
        strides = tuple(strides)
    if g.stride() == strides or (g.is_contiguous() and _contiguous(shape, strides)):
        return g if g.dtype == dtype else g.to(dtype)  # same layout: at most a contiguous cast (torch's, at bandwidth)
    out = torch.empty_strided(shape, strides, device=g.device, dtype=dtype)
    return _copy_into(out, g)


def grads(dA: torch.Tensor | None, dB: torch.Tensor | None, meta):
    """Gradients of :func:`prepare`'s inputs from those of its outputs: ``dA`` in ``A``'s dtype, ``dB`` in ``B``'s
    dtype and layout (for peft's ``lora_B``: the parameter's own memory order)."""
    a_dtype, b_dtype, b_shape, b_strides = meta
    if dA is not None and dA.dtype != a_dtype:
        dA = dA.to(a_dtype)
    return dA, grad_like(dB, b_dtype, b_shape, b_strides)


class LoraLayoutFunction(torch.autograd.Function):
    """``(A, B, dtype) -> (A_k, B_k)`` as one autograd node (see the module docstring)."""

    @staticmethod
    def forward(ctx, A, B, dtype):
        Ak, Bk, ctx.meta = prepare(A, B, dtype)
        return Ak, Bk

    @staticmethod
    def backward(ctx, dAk, dBk):
        dA, dB = grads(dAk if ctx.needs_input_grad[0] else None, dBk if ctx.needs_input_grad[1] else None, ctx.meta)
        return dA, dB, None
