"""Autograd-level entry points (public, stable API).

``scattered_experts(x, W, k, sorted_expert_idxs, sorted_scattered_idxs, expert_offsets,
lora_A=None, lora_B=None, scaling=1.0, bias=None, grouped_in=False, grouped_out=False, *,
fused_lora=None, split_threshold=None, split_max_experts=None, backend=None) -> Tensor``

runs ONE expert projection: gather → ``x·W_e + scaling·(x·A_eᵀ)·B_eᵀ + b_e`` → scatter.

* ``x``: ``[T, K]`` token rows (``grouped_in=False``; sorted position ``p`` reads row
  ``sorted_scattered_idxs[p] // k``) or ``[T*k, K]`` already in sorted order (``grouped_in=True``).
* ``W``: ``[E, K, N]`` expert weights, any strides (pass ``weight.transpose(1, 2)`` for the
  transformers ``[E, N, K]`` layout; nothing is copied).
* ``k``: top-k (fan-out of each token); use ``1`` when ``x`` is grouped.
* ``sorted_expert_idxs``, ``sorted_scattered_idxs``, ``expert_offsets``: from
  :func:`host_plugin_scattermoe.routing.sort_tokens`.
* ``lora_A``: ``[E, r, K]``, ``lora_B``: ``[E, N, r]`` (kernel layout; see
  :func:`host_plugin_scattermoe.lora.expert_lora`), ``scaling``: LoRA ``alpha / r``.
* ``bias``: ``[E, N]`` or ``None``.
* ``grouped_out``: ``True`` → ``[T*k, N]`` rows in sorted order; ``False`` → ``[T*k, N]`` rows in
  flat ``t*k + j`` order (feed to :func:`combine`).
* ``fused_lora`` / ``split_threshold`` / ``split_max_experts``: LoRA forward dispatch; ``None``
  uses the plugin settings (``SETTINGS``). The split path (a rank-``r`` grouped GEMM for ``x·Aᵀ``,
  then the base GEMM with ``·Bᵀ`` in its epilogue) is taken when ``fused_lora`` is off, or when
  ``E <= split_max_experts`` and ``K*N >= split_threshold`` (few, large experts, e.g. Mixtral).
* ``backend``: ``"triton"``, ``"torch"`` or ``"auto"`` (default: Triton for CUDA tensors, the
  torch reference otherwise; ``"triton"`` on CPU tensors needs ``TRITON_INTERPRET=1``).

Gradients flow to ``x``, ``W`` (full fine-tune), ``bias``, ``lora_A`` and ``lora_B``. The backward
computes ``dX = dY·Wᵀ + s·(dY·B)·A`` in one fused kernel (which also emits the rank-sized
``dY·B``), and ``dA = s·(dY·B)ᵀ·X``, ``dB = s·dYᵀ·(X·Aᵀ)`` as grouped products over the rank-sized
intermediates (``X·Aᵀ`` is kept from the forward); there is no per-expert host synchronisation.

``combine(y, gates) -> Tensor``: ``out[t] = Σ_j gates[t, j]·y[t*k + j]``, differentiable in both.

``silu_glu(h) -> Tensor``: ``silu(h[:, :I]) * h[:, I:]`` fused (the default gate of most families).

``clamped_glu(h, alpha, limit) -> Tensor``: gpt-oss's interleaved, clamped sigmoid-GLU, fused.
"""

from __future__ import annotations

import os

import torch

from host_plugin_scattermoe import kernels as K
from host_plugin_scattermoe import reference, relayout

#: Plugin-wide defaults, set from the config by ``pre_model_load``.
SETTINGS: dict = {
    "fused_lora": True,
    "split_threshold": 8_000_000,
    "split_max_experts": 32,
    "fused_tail": os.environ.get("SCATTERMOE_FUSED_TAIL", "0") == "1",
    "cuda_graph": os.environ.get("SCATTERMOE_CUDA_GRAPH", "0") == "1",
    # fused Triton kernels for the SiLU and gpt-oss gates (env SCATTERMOE_FUSED_GATES=0: the module's own code,
    # for before/after measurements)
    "fused_gates": os.environ.get("SCATTERMOE_FUSED_GATES", "1") == "1",
    # the default SiLU-gated experts call as one autograd node (glu_experts; env SCATTERMOE_MERGED=0: the separate
    # nodes, for before/after measurements). Same kernels and numbers either way.
    "merged": os.environ.get("SCATTERMOE_MERGED", "1") == "1",
    # the merged node's light tail (see _GluExpertsFunction): "glu" (default; env SCATTERMOE_LIGHT_TAIL=1 or glu) gate
    # scaling and dgates in the SiLU-GLU backward kernel, "gemm" (env =gemm) in the down projection's dX epilogue,
    # "0" (env =0) the old backward (the combine backward as its own kernel over the kept expert outputs y)
    "light_tail": os.environ.get("SCATTERMOE_LIGHT_TAIL", "glu"),
    # the merged node's SiLU-GLU in the up projection's epilogue (kernels.scatter2scatter(act_out=...): h and act from
    # one launch, bitwise the separate launches'); env SCATTERMOE_GLU_EPILOGUE=1 turns it on, 0: the up projection,
    # then silu_glu_fwd. Off by default until a GPU run (triton 3.6, sm_90) has checked and timed it.
    "glu_epilogue": os.environ.get("SCATTERMOE_GLU_EPILOGUE", "0") == "1",
    # the router as one node: logits GEMM, softmax, top-k and renormalisation in one kernel (router.py; env
    # SCATTERMOE_FUSED_ROUTER=0: the model's own router, for before/after measurements)
    "fused_router": os.environ.get("SCATTERMOE_FUSED_ROUTER", "1") == "1",
    "backend": "auto",
}


def _use_triton(x: torch.Tensor, backend: str | None) -> bool:
    backend = backend or SETTINGS["backend"]
    if backend == "torch":
        return False
    if backend == "triton":
        if not (x.is_cuda or K.INTERPRET):
            raise RuntimeError("scattermoe backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
        return True
    return x.is_cuda


def use_split(E: int, Kdim: int, N: int, fused_lora=None, split_threshold=None, split_max_experts=None) -> bool:
    """Whether the LoRA forward takes the split path for an ``[E, K, N]`` projection."""
    fused = SETTINGS["fused_lora"] if fused_lora is None else fused_lora
    thr = SETTINGS["split_threshold"] if split_threshold is None else split_threshold
    emax = SETTINGS["split_max_experts"] if split_max_experts is None else split_max_experts
    if not fused:
        return True
    return E <= emax and Kdim * N >= thr


def lora_linear_fwd(x, W, ssi, offs, k, A, B, scaling, bias, grouped_in, grouped_out, split, want_xa, act_out=None,
                    act_clamp=None):
    """Forward launcher shared with the backward's dX (which passes transposed views). ``act_out``: the GLU of the
    output (SiLU of ``[gate | up]``, or with ``act_clamp`` gpt-oss's clamped one of interleaved columns), written by the
    (main) launch's epilogue (see ``kernels.scatter2scatter``)."""
    if B is None:
        y, _ = K.scatter2scatter(x, W, ssi, offs, k, bias=bias, grouped_in=grouped_in, grouped_out=grouped_out,
                                 act_out=act_out, act_clamp=act_clamp)
        return y, None
    if split:
        xa = K.rank_xa(x, A, ssi, offs, k, grouped_in)
        y, _ = K.scatter2scatter(
            x, W, ssi, offs, k, B=B, xa_in=xa, scaling=scaling, bias=bias, grouped_in=grouped_in, grouped_out=grouped_out,
            act_out=act_out, act_clamp=act_clamp,
        )
        return y, xa
    return K.scatter2scatter(
        x, W, ssi, offs, k, A=A, B=B, scaling=scaling, bias=bias,
        grouped_in=grouped_in, grouped_out=grouped_out, write_xa=want_xa, act_out=act_out, act_clamp=act_clamp,
    )


def cast_lora(lora_A, lora_B, scaling: float, dtype: torch.dtype):
    """Checked LoRA factors in the weights' dtype, or ``(None, None)`` when absent or ``scaling == 0``.

    One compute dtype, the weights' (peft keeps LoRA factors in fp32 on a bf16 model; autograd casts back)."""
    if not _lora_applies(lora_A, lora_B, scaling):
        return None, None
    return lora_A.to(dtype), lora_B.to(dtype)


def _lora_applies(lora_A, lora_B, scaling: float) -> bool:
    """Both factors given and ``scaling != 0``; one factor without the other is an error."""
    if (lora_A is None) != (lora_B is None):
        raise ValueError("pass both lora_A and lora_B, or neither")
    return lora_A is not None and scaling != 0


def kernel_strides(lora_A, lora_B):
    """Kernel-friendly strides (tiny copies, autograd-tracked): A [E, r, K] contiguous along K (forward K loop,
    dX epilogue), B [E, N, r] contiguous along N (forward epilogue, dX K loop). peft's rank-major lora_B would
    otherwise be read with an E-element stride inside the dX K loop."""
    if lora_A is None:
        return None, None
    return lora_A.contiguous(), lora_B.transpose(1, 2).contiguous().transpose(1, 2)


def kernel_lora(lora_A, lora_B, scaling: float, dtype: torch.dtype):
    """``kernel_strides(*cast_lora(...))`` with one copy per factor instead of two: the cast and the re-layout are one
    ``to(dtype, memory_format=contiguous)`` (one kernel forward, one backward; a no-op when both already hold)."""
    if not _lora_applies(lora_A, lora_B, scaling):
        return None, None
    if relayout.applies(lora_B) and not relayout.ready(lora_A, lora_B, dtype):
        # one autograd node: B through a tiled Triton transpose(+cast), dB written back in the parameter's own layout
        # (relayout.py; SCATTERMOE_TILED_RELAYOUT=0 keeps the torch copies below)
        return relayout.LoraLayoutFunction.apply(lora_A, lora_B, dtype)
    # to() returns its input when the dtype already matches, whatever memory_format says: contiguous() then copies
    contig = torch.contiguous_format
    A = lora_A.to(dtype, memory_format=contig).contiguous()
    Bt = lora_B.transpose(1, 2).to(dtype, memory_format=contig).contiguous()
    return A, Bt.transpose(1, 2)


class ScatteredExpertsFunction(torch.autograd.Function):
    """Autograd glue of the Triton kernels (see module docstring for the math)."""

    @staticmethod
    def forward(ctx, x, W, bias, A, B, sei, ssi, offs, k, scaling, grouped_in, grouped_out, split):
        has_lora = B is not None
        need_lora_grad = has_lora and (A.requires_grad or B.requires_grad)
        y, xa = lora_linear_fwd(x, W, ssi, offs, k, A, B, scaling, bias, grouped_in, grouped_out, split, need_lora_grad)
        # x is only read again for dA and dW; frozen W without LoRA-A training does not keep it alive.
        keep_x = ctx.needs_input_grad[1] or ctx.needs_input_grad[3]
        ctx.save_for_backward(x if keep_x else None, W, A, B, xa, sei, ssi, offs)
        ctx.k, ctx.scaling, ctx.grouped_in, ctx.grouped_out, ctx.split = k, scaling, grouped_in, grouped_out, split
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, W, A, B, xa, sei, ssi, offs = ctx.saved_tensors
        need_x, need_W, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        dx, dW, db, dA, dB = proj_backward(
            dy.contiguous(), x, W, A, B, xa, sei, ssi, offs, ctx.k, ctx.scaling, ctx.grouped_in, ctx.grouped_out,
            ctx.split, need_x, need_W, need_b and ctx.has_bias, need_A, need_B,
        )
        return dx, dW, db, dA, dB, None, None, None, None, None, None, None, None


def proj_backward(dy, x, W, A, B, xa, sei, ssi, offs, k, s, gin, gout, split, need_x, need_W, need_b, need_A, need_B):
    """Gradients ``(dx, dW, db, dA, dB)`` of one projection (``None`` where not needed); ``dy`` contiguous, ``A``/``B``
    in kernel layout and dtype, ``xa`` the forward's rank intermediate (shared by the separate and merged nodes)."""
    E, Kdim, N = W.shape
    has_lora = B is not None
    dx = dW = db = dA = dB = None
    dyb = None
    # dy rows: sorted position (gout) or flat index ssi[p] (fan-out 1).
    if need_x:
        Wt = W.transpose(1, 2)
        if has_lora:
            dx, dyb = lora_linear_fwd(
                dy, Wt, ssi, offs, 1, B.transpose(1, 2), A.transpose(1, 2), s, None, gout, gin, split, need_A
            )
        else:
            dx, _ = lora_linear_fwd(dy, Wt, ssi, offs, 1, None, None, 0.0, None, gout, gin, False, False)
        if not gin and k > 1:
            dx = dx.view(-1, k, Kdim).sum(1)
    if has_lora and need_A and dyb is None:
        dyb = K.rank_xa(dy, B.transpose(1, 2), ssi, offs, 1, gout)
    x_fan = 0 if gin else k
    dy_fan = 0 if gout else 1
    if has_lora and need_A:
        dA = K.group_outer(dyb, x, ssi, offs, l_fan=0, r_fan=x_fan, scaling=s, out_dtype=A.dtype, compute_dtype=x.dtype)
    if has_lora and need_B:
        dB = K.group_outer(dy, xa, ssi, offs, l_fan=dy_fan, r_fan=0, scaling=s, out_dtype=B.dtype, compute_dtype=dy.dtype)
    if need_W:
        dW = K.group_outer(x, dy, ssi, offs, l_fan=x_fan, r_fan=dy_fan, out_dtype=W.dtype, compute_dtype=dy.dtype)
    if need_b:
        # each expert's row sum of dy as a grouped product with a ones column (fp32 accumulation, a fixed order: torch's
        # index_add_ sums with atomics on CUDA, so the bias gradient changed in the last bits from run to run)
        ones = torch.ones(dy.shape[0], 1, device=dy.device, dtype=dy.dtype)
        db = K.group_outer(ones, dy, ssi, offs, l_fan=0, r_fan=dy_fan, out_dtype=torch.float32,
                           compute_dtype=dy.dtype).view(E, N)
    return dx, dW, db, dA, dB


def scattered_experts(
    x: torch.Tensor,
    W: torch.Tensor,
    k: int,
    sorted_expert_idxs: torch.Tensor,
    sorted_scattered_idxs: torch.Tensor,
    expert_offsets: torch.Tensor,
    lora_A: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None,
    scaling: float = 1.0,
    bias: torch.Tensor | None = None,
    grouped_in: bool = False,
    grouped_out: bool = False,
    *,
    fused_lora: bool | None = None,
    split_threshold: int | None = None,
    split_max_experts: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """One expert projection with optional LoRA; see the module docstring for every argument."""
    dt = W.dtype
    if x.dtype != dt:
        x = x.to(dt)
    if bias is not None and bias.dtype != dt:
        bias = bias.to(dt)
    if not _use_triton(x, backend):
        lora_A, lora_B = cast_lora(lora_A, lora_B, scaling, dt)
        return reference.scattered_linear(
            x, W, k, sorted_expert_idxs, sorted_scattered_idxs, expert_offsets,
            lora_A, lora_B, scaling, bias, grouped_in, grouped_out,
        )
    lora_A, lora_B = kernel_lora(lora_A, lora_B, scaling, dt)
    E, Kdim, N = W.shape
    split = lora_A is not None and use_split(E, Kdim, N, fused_lora, split_threshold, split_max_experts)
    return ScatteredExpertsFunction.apply(
        x, W, bias, lora_A, lora_B, sorted_expert_idxs, sorted_scattered_idxs, expert_offsets,
        int(k), float(scaling), bool(grouped_in), bool(grouped_out), split,
    )


class _CombineFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, gates):
        ctx.save_for_backward(y, gates)
        return K.combine(y, gates)

    @staticmethod
    def backward(ctx, dout):
        y, gates = ctx.saved_tensors
        need_dy, need_dg = ctx.needs_input_grad[:2]
        return K.combine_bwd(y, gates, dout, need_dy, need_dg)


def combine(y: torch.Tensor, gates: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Weighted sum of each token's ``k`` expert outputs; ``y`` ``[T*k, N]`` flat order, ``gates`` ``[T, k]``."""
    if not _use_triton(y, backend):
        return reference.combine(y, gates)
    return _CombineFunction.apply(y.contiguous(), gates.contiguous())


class _SiluGluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        return K.silu_glu_fwd(h)

    @staticmethod
    def backward(ctx, dout):
        (h,) = ctx.saved_tensors
        return K.silu_glu_bwd(h, dout.contiguous())


def silu_glu(h: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """``silu(gate) * up`` for the concatenated ``[gate | up]`` layout, one fused Triton kernel each way."""
    if not _use_triton(h, backend) or h.stride(-1) != 1:
        return reference.glu(h)
    return _SiluGluFunction.apply(h)


class _ClampedGluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, alpha, limit):
        ctx.save_for_backward(h)
        ctx.alpha, ctx.limit = alpha, limit
        return K.clamped_glu_fwd(h, alpha, limit)

    @staticmethod
    def backward(ctx, dout):
        (h,) = ctx.saved_tensors
        return K.clamped_glu_bwd(h, dout.contiguous(), ctx.alpha, ctx.limit), None, None


def clamped_glu(h: torch.Tensor, alpha: float, limit: float, *, backend: str | None = None) -> torch.Tensor:
    """gpt-oss's gate: interleaved ``[gate, up]`` columns, ``(clamp(up, ±limit) + 1) · g·sigmoid(alpha·g)`` with
    ``g = min(gate, limit)``; one fused Triton kernel each way (the torch reference elsewhere)."""
    if not _use_triton(h, backend) or h.stride(-1) != 1:
        return reference.gpt_oss_glu(h, alpha, limit)
    return _ClampedGluFunction.apply(h, float(alpha), float(limit))


def _prepare_lora(A, B, s, dtype, tiled):
    """``(A_k, B_k, meta)`` of one projection inside the merged node: ``relayout.prepare`` (meta for
    ``relayout.grads``), or ``kernel_lora``'s torch copies (meta None); ``(None, None, None)`` without LoRA."""
    if B is None:
        return None, None, None
    if tiled:
        return relayout.prepare(A, B, dtype)
    return (*kernel_lora(A, B, s, dtype), None)


class _GluExpertsFunction(torch.autograd.Function):
    """The whole experts MLP as ONE autograd node (host time, issue 16): up projection (gathered, grouped
    out, + bias ``b1``), the gate (SiLU-GLU, or gpt-oss's interleaved clamped sigmoid-GLU when ``clamp`` is
    ``(alpha, limit)``), down projection (grouped in, flat out, + bias ``b2``), combine; the LoRA factors' cast and
    re-layout (``kernel_lora``) inside. The forward launches exactly the kernels of the separate nodes
    (``ScatteredExpertsFunction`` ×2 with the biases in their epilogues, ``_SiluGluFunction`` /
    ``_ClampedGluFunction``, ``_CombineFunction``, ``relayout.LoraLayoutFunction``), in the same order and with the
    same arguments, so its output is bitwise theirs; what goes is ~8 autograd nodes forward and backward and their
    Python/engine overhead.

    Backward, light tail (``SETTINGS["light_tail"]``, default ``"glu"``; env ``SCATTERMOE_LIGHT_TAIL=0`` for the old
    one): the combine's backward is folded into the launches around it. The down projection's dX launch reads the
    token gradient ``dout [T, H]`` gathered (``ssi // k``, like the forward's input) instead of ``dy = g·dout``, so it
    computes ``d(act) / g``; the routing weight ``g`` is applied and the routing weight's gradient
    ``dg = <dout, y> = Σ act·(dout·W_eᵀ + s·(dout·B_e)·A_e)`` reduced (fp32 partials per column block, summed once:
    deterministic) either

    * ``"glu"``: in the gate's backward kernel (``kernels.silu_glu_gate_bwd`` / ``kernels.clamped_glu_gate_bwd``),
      which reads ``h`` anyway and recomputes ``act`` from it; the dX launch is the separate nodes' own (same tiles,
      plain store), or
    * ``"gemm"``: in the dX launch's epilogue (``kernels.glu_down_dx(glu=False)``) against the saved activation.
      At the rule's 128×256 TMA tile that epilogue needs 255 registers and spills (``bench/sm90_compile_check.py
      --light``), hence not the default.

    With a down bias ``y = act·W2_e + b2_e (+ LoRA)``, so ``dg`` also takes ``<dout[t], b2[e]>`` per flat row
    (``kernels.bias_dg``: one small launch, ``dout·b2ᵀ`` per token block in fp32, each row's expert picked; added to
    the fp32 ``dg`` before its cast). The up bias's gradient is ``proj_backward``'s (the rows of ``dh``, which hold
    ``g`` already).

    So the expert outputs ``y [T*k, H]`` are not kept from the forward (134 MB per layer at Qwen3-30B-A3B,
    T=4096), and ``dy [T*k, H]`` and the combine-backward kernel are gone. The LoRA gradients take ``g`` on the
    rank-sized side: ``dA2 = s·(g·dout·B)ᵀ·act``, ``dB2 = s·doutᵀ·(g·act·Aᵀ)``. Gradients equal the separate nodes'
    within rounding (``g`` is applied after the GEMM, in fp32, instead of to its bf16 input), not bitwise. The old
    backward (``K.combine_bwd`` over the kept ``y``, then the separate nodes' launches: bitwise theirs) still runs
    where the light one would cost more: a trainable down-projection weight or bias (``dW2``/``db2`` want ``g·dout``
    rows), no gradient into the up projection (then ``dg`` alone would need the whole dX GEMM), and, for ``"gemm"``,
    an activation kept only for ``dg`` that is wider than ``y`` (``I > H`` without down-projection LoRA)."""

    @staticmethod
    def forward(ctx, x, W1, W2, A1, B1, A2, B2, gates, sei, ssi, offs, k, s1, s2, split1, split2, b1, b2, clamp):
        need = ctx.needs_input_grad
        dt = W1.dtype
        # the factors' cast and re-layout (kernel_lora's, without its autograd node: the backward below does its part)
        tiled = relayout.applies(x)
        ctx.tiled = tiled
        A1k, B1k, ctx.meta1 = _prepare_lora(A1, B1, s1, dt, tiled)
        # SETTINGS["glu_epilogue"]: act = the gate of h from the up projection's epilogue (bitwise silu_glu_fwd's /
        # clamped_glu_fwd's)
        act = x.new_empty(ssi.numel(), W1.shape[2] // 2) if SETTINGS["glu_epilogue"] else None
        h, xa1 = lora_linear_fwd(x, W1, ssi, offs, k, A1k, B1k, s1, b1, False, True, split1,
                                 B1 is not None and (need[3] or need[4]), act_out=act, act_clamp=clamp)
        # the down projection's factors after the up projection's launch: the GPU starts the first GEMM sooner
        A2k, B2k, ctx.meta2 = _prepare_lora(A2, B2, s2, dt, tiled)
        if act is None:
            act = K.silu_glu_fwd(h) if clamp is None else K.clamped_glu_fwd(h, *clamp)
        y, xa2 = lora_linear_fwd(act, W2, ssi, offs, 1, A2k, B2k, s2, b2, True, False, split2,
                                 B2 is not None and (need[5] or need[6]))
        out = K.combine(y, gates)
        ctx.save_for_backward(x if (need[1] or need[3]) else None, gates, W1, W2, A1k, B1k, xa1, A2k, B2k, xa2, sei, ssi, offs,
                              b2 if b2 is not None and need[7] else None)
        up = need[0] or need[1] or need[3] or need[4] or need[16]  # gradient flows into h
        I, H = W2.shape[1], W2.shape[2]
        mode = _light_mode()
        # a trainable down bias, like a trainable down weight, wants the g·dout rows: the old backward
        light = bool(mode and up and not need[2] and not need[17] and (mode == "glu" or need[5] or not need[7] or I <= H))
        ctx.light = mode if light else None
        # The activations (kept as the separate nodes keep them: h for the gate, act for dA/dW (and, light, for the
        # routing weights' gradient), y for the combine unless light) are held on ctx, not saved, so the backward
        # frees each one after its last use, as the separate nodes' release does: the step's peak memory is at most
        # the separate nodes'. Hence one backward only (no retain_graph), and the caller keeps the separate nodes
        # under saved-tensor hooks (experts.py). A forward captured into a CUDA graph (graphs.py) keeps them instead:
        # its replays write and read them where the capture put them, so no later capture may be given that memory.
        ctx.keep = x.is_cuda and torch.cuda.is_current_stream_capturing()
        keep_act = need[2] or need[5] or (ctx.light == "gemm" and need[7])
        # each sorted row's routing weight for the light tail's LoRA gradients, made here, where the host is ahead of
        # the GPU, rather than before the backward's first GEMM (a synchronised step waits for that launch)
        ctx.g_sorted = None  # [L, 1] fp32
        if light and _wants_sorted_gates(B2, need[5], need[6], split2, ctx.light):
            ctx.g_sorted = gates.reshape(-1).index_select(0, ssi).float()[:, None]
        ctx.acts = [h, act if keep_act else None, None if light else y]
        ctx.k, ctx.s1, ctx.s2, ctx.split1, ctx.split2, ctx.clamp = k, s1, s2, split1, split2, clamp
        ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
        ctx.lora_dtypes = (A1.dtype if A1 is not None else None, B1.dtype if B1 is not None else None,
                           A2.dtype if A2 is not None else None, B2.dtype if B2 is not None else None)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, gates, W1, W2, A1, B1, xa1, A2, B2, xa2, sei, ssi, offs, b2 = ctx.saved_tensors
        if ctx.acts is None:
            raise RuntimeError(
                "scattermoe: the experts node (ops.glu_experts) frees its activations in its backward, which ran "
                "already; for a second backward through the same graph (retain_graph=True) set SCATTERMOE_MERGED=0"
            )
        h, act, y = ctx.acts
        if not ctx.keep:
            ctx.acts = None
        nx, nW1, nW2, nA1, nB1, nA2, nB2, ng = ctx.needs_input_grad[:8]
        nb1 = ctx.has_b1 and ctx.needs_input_grad[16]
        nb2 = ctx.has_b2 and ctx.needs_input_grad[17]
        up = nx or nW1 or nA1 or nB1 or nb1  # gradient flows into h
        down = up or nW2 or nA2 or nB2 or nb2  # ... into y
        dW1 = dW2 = dA1 = dB1 = dA2 = dB2 = dx = dg = db1 = db2 = None
        dg_bias = None  # the light tail's dg share of the down bias: <dout[t], b2[e]> per flat row
        if ctx.light:
            dout = dout.contiguous()
            if b2 is not None:
                dg_bias = K.bias_dg(dout, b2, K.flat_experts(sei, ssi), ctx.k)
            dact, dA2, dB2, dg = _light_tail_backward(dout, act, gates, W2, A2, B2, xa2, ssi, offs, ctx.k,
                                                      ctx.s2, ctx.split2, nA2, nB2, ng, ctx.light, ctx.g_sorted)
            if not ctx.keep:
                ctx.g_sorted = None
            if dg is not None and dg_bias is not None:  # "gemm": dg [T, k] from the dX epilogue
                dg = dg + dg_bias.view(dg.shape)
            del act, xa2
        elif down:
            dy, dg = K.combine_bwd(y, gates, dout, down, ng)
            del y  # each activation and gradient is dropped after its last use (peak memory as the separate nodes)
            dact, dW2, db2, dA2, dB2 = proj_backward(
                dy, act, W2, A2, B2, xa2, sei, ssi, offs, 1, ctx.s2, True, False, ctx.split2, up, nW2, nb2, nA2, nB2
            )
            del dy, act
        else:
            _, dg = K.combine_bwd(y, gates, dout, False, ng)
            del y
        if down:
            if up:
                if ctx.light == "glu":  # dact is d(act) / g: the routing weight and dgates here (see the class doc)
                    if ctx.clamp is None:
                        dh, dg = K.silu_glu_gate_bwd(h, dact, gates, ssi, ng, dg_bias)
                    else:
                        dh, dg = K.clamped_glu_gate_bwd(h, dact, gates, ssi, *ctx.clamp, ng, dg_bias)
                elif ctx.clamp is None:
                    dh = K.silu_glu_bwd(h, dact)
                else:
                    dh = K.clamped_glu_bwd(h, dact, *ctx.clamp)
                del h, dact
                dx, dW1, db1, dA1, dB1 = proj_backward(
                    dh, x, W1, A1, B1, xa1, sei, ssi, offs, ctx.k, ctx.s1, False, True, ctx.split1, nx, nW1, nb1, nA1, nB1
                )
        dg = dg.to(gates.dtype) if dg is not None else None
        if ctx.tiled:  # dA cast back, dB straight into the parameter's layout and dtype (relayout.grads)
            if ctx.meta1 is not None:
                dA1, dB1 = relayout.grads(dA1, dB1, ctx.meta1)
            if ctx.meta2 is not None:
                dA2, dB2 = relayout.grads(dA2, dB2, ctx.meta2)
        else:
            tA1, tB1, tA2, tB2 = ctx.lora_dtypes
            # the casts' backward (ToCopyBackward): back to the factors' own dtype
            dA1 = dA1.to(tA1) if dA1 is not None else None
            dB1 = dB1.to(tB1) if dB1 is not None else None
            dA2 = dA2.to(tA2) if dA2 is not None else None
            dB2 = dB2.to(tB2) if dB2 is not None else None
        return dx, dW1, dW2, dA1, dB1, dA2, dB2, dg, None, None, None, None, None, None, None, None, db1, db2, None


def _light_mode():
    """The light tail's variant from ``SETTINGS["light_tail"]``: ``"glu"``, ``"gemm"`` or None (off)."""
    m = SETTINGS.get("light_tail", "glu")
    if m in (None, False, "0", "", "off"):
        return None
    if m in (True, "1", "glu"):
        return "glu"
    if m == "gemm":
        return "gemm"
    raise ValueError(f"scattermoe: light_tail / SCATTERMOE_LIGHT_TAIL must be 0, 1, glu or gemm, got {m!r}")


def _wants_sorted_gates(B2, nA2: bool, nB2: bool, split: bool, mode) -> bool:
    """Whether the light tail's backward reads each sorted row's routing weight (its LoRA gradients)."""
    return B2 is not None and (nB2 or ((split or mode == "glu") and nA2))


def _light_tail_backward(dout, act, gates, W2, A2, B2, xa2, ssi, offs, k, s, split, nA2, nB2, ng, mode, g_sorted):
    """The light tail's down-projection backward (see :class:`_GluExpertsFunction`): ``(dact [L, I] grouped, dA2,
    dB2, dg [T, k] fp32)``, ``None`` where not needed; ``dout [T, H]`` contiguous, ``A2``/``B2`` in kernel layout,
    ``g_sorted [L, 1]`` each sorted row's routing weight (made in the forward) where :func:`_wants_sorted_gates`.
    ``mode == "glu"``: a plain dX launch, so ``dact`` is ``d(act) / g`` and ``dg`` None (both left to
    ``K.silu_glu_gate_bwd``); ``"gemm"``: the dX epilogue applies ``g`` and reduces ``dg`` against ``act``."""
    Wt = W2.transpose(1, 2)
    dA2 = dB2 = None
    gyb = None  # g·(dout·B2) [L, r] fp32, grouped
    if mode == "glu":
        # the dX launch of the separate nodes' down projection, fed dout [T, H] gathered (ssi // k) instead of dy
        if B2 is not None:
            dact, dyb = lora_linear_fwd(dout, Wt, ssi, offs, k, B2.transpose(1, 2), A2.transpose(1, 2), s, None,
                                        False, True, split, nA2)
            gyb = dyb.mul_(g_sorted) if nA2 else None
            del dyb
        else:
            dact, _ = lora_linear_fwd(dout, Wt, ssi, offs, k, None, None, 0.0, None, False, True, False, False)
        dg = None
    elif B2 is not None and split:
        # rank-r GEMM dout·B2 first (gathered, grouped out, fp32), then the base GEMM with its ·A2 epilogue
        dyb, _ = K.scatter2scatter(dout, B2, ssi, offs, k, grouped_out=True, out_dtype=torch.float32)
        dact, _, dg = K.glu_down_dx(dout, Wt, ssi, offs, k, act, gates, B=A2.transpose(1, 2), xa_in=dyb, scaling=s,
                                    glu=False, need_dg=ng)
        if nA2:
            gyb = dyb.mul_(g_sorted)
        del dyb
    elif B2 is not None:
        dact, gyb, dg = K.glu_down_dx(dout, Wt, ssi, offs, k, act, gates, A=B2.transpose(1, 2), B=A2.transpose(1, 2),
                                      scaling=s, write_xa=nA2, glu=False, need_dg=ng)
    else:
        dact, _, dg = K.glu_down_dx(dout, Wt, ssi, offs, k, act, gates, glu=False, need_dg=ng)
    if B2 is not None and nA2:
        dA2 = K.group_outer(gyb, act, ssi, offs, scaling=s, out_dtype=A2.dtype, compute_dtype=act.dtype)
    if B2 is not None and nB2:
        dB2 = K.group_outer(dout, xa2 * g_sorted, ssi, offs, l_fan=k, scaling=s, out_dtype=B2.dtype,
                            compute_dtype=dout.dtype)
    return dact, dA2, dB2, dg


def glu_experts(x, W1, W2, k, sei, ssi, offs, lora1=None, lora2=None, gates=None, *, b1=None, b2=None, clamp=None,
                fused_lora=None, split_threshold=None, split_max_experts=None) -> torch.Tensor:
    """``combine(glu(x·W1 + b1 (+LoRA)) · W2 + b2 (+LoRA), gates)`` as one autograd node (Triton path only; see
    :class:`_GluExpertsFunction`). ``W1 [E, H, 2I]``, ``W2 [E, I, H]`` kernel-layout views, ``lora1``/``lora2``
    ``(A [E, r, in], B [E, out, r], scaling)`` or None, ``x`` ``[T, H]`` in the weights' dtype, ``gates [T, k]``;
    ``b1 [E, 2I]``, ``b2 [E, H]`` the projections' biases or None (cast to the weights' dtype as
    :func:`scattered_experts` does); ``clamp``: None for the SiLU-GLU of concatenated ``[gate | up]`` halves
    (``silu_glu``), ``(alpha, limit)`` for gpt-oss's interleaved clamped sigmoid-GLU (``clamped_glu``)."""
    A1, B1, s1 = lora1 if lora1 is not None else (None, None, 0.0)
    A2, B2, s2 = lora2 if lora2 is not None else (None, None, 0.0)
    if not _lora_applies(A1, B1, s1):
        A1 = B1 = None
    if not _lora_applies(A2, B2, s2):
        A2 = B2 = None
    dt = W1.dtype
    if b1 is not None and b1.dtype != dt:
        b1 = b1.to(dt)
    if b2 is not None and b2.dtype != dt:
        b2 = b2.to(dt)
    if clamp is not None:
        clamp = (float(clamp[0]), float(clamp[1]))
    E, H, I2 = W1.shape
    split1 = B1 is not None and use_split(E, H, I2, fused_lora, split_threshold, split_max_experts)
    split2 = B2 is not None and use_split(E, W2.shape[1], W2.shape[2], fused_lora, split_threshold, split_max_experts)
    return _GluExpertsFunction.apply(
        x, W1, W2, A1, B1, A2, B2, gates.contiguous(), sei, ssi, offs, int(k), float(s1), float(s2), split1, split2,
        b1, b2, clamp,
    )
