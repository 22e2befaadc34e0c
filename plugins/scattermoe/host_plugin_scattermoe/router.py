"""The MoE router as one autograd node: one Triton kernel for the logits GEMM, softmax, top-k, renormalisation and cast;
its backward is one kernel (``router_kernels``) for the input gradient (``scattermoe_fused_router``, on by default).

Why: a synchronised block step waits on the host until the first expert GEMM is enqueued, and transformers' router
(linear, softmax, top-k, sum, divide, cast: 9 kernels, ~14 more in the backward; cuBLAS alone costs ~100 µs of host
time per logits GEMM on an H100 host) is most of that wait (``bench/trace_step.py``). The results are the model's
own math: the logits accumulated in fp32 and rounded to the input dtype (an element whose sum lands next to a rounding
boundary may round the other way: 1 ulp, so a token whose k-th and (k+1)-th experts are that close may pick the
other), the experts by the same rule (among equal values the lowest ids; ``torch.topk`` leaves that order open), the
weights to a few ulps, and the gradients of the same formula.

Which routers: the classes in :data:`SPECS`, whose ``forward`` this module's formulas reproduce (transformers 5.x):

* ``"softmax"``: fp32 softmax of the logits, top-k of the probabilities, divided by their sum when ``norm`` (a bool,
  or the name of the module's flag), cast back to the logits' dtype unless ``scores`` is ``"float32"`` (Mixtral);
* ``"topk_softmax"``: top-k of the logits (bias included), softmax over the k in the logits' dtype (gpt-oss).

:func:`install` gives each such module this forward. A module's first fused call is checked against its class's own
``forward`` on up to 256 tokens (without gradients); a class whose output differs (a transformers release that changed
its router) keeps its own forward, with a warning. Under autocast (HF Trainer's ``bf16: true``) it computes in
autocast's dtype, as the module's ``F.linear`` does. Everything else runs the module's own forward: the switch off, the
experts' torch backend (``scattermoe_backend``: ``auto`` fuses on CUDA, ``triton`` also under the interpreter),
mismatched dtypes outside autocast, a parametrised (peft) or sharded router weight, more than
``router_kernels.MAX_EXPERTS`` experts, or ``torch.compile`` tracing.
"""

from __future__ import annotations

import logging
import os
import types
import warnings

import torch
from torch.nn.utils import parametrize

_TM = "transformers.models"
#: router class (dotted path): (kind, norm: bool or the module's flag attribute, scores dtype: "logits" or "float32")
SPECS: dict[str, tuple[str, bool | str, str]] = {
    f"{_TM}.qwen2_moe.modeling_qwen2_moe.Qwen2MoeTopKRouter": ("softmax", "norm_topk_prob", "logits"),
    f"{_TM}.qwen3_moe.modeling_qwen3_moe.Qwen3MoeTopKRouter": ("softmax", "norm_topk_prob", "logits"),
    f"{_TM}.qwen3_next.modeling_qwen3_next.Qwen3NextTopKRouter": ("softmax", "norm_topk_prob", "logits"),
    f"{_TM}.qwen3_5_moe.modeling_qwen3_5_moe.Qwen3_5MoeTopKRouter": ("softmax", True, "logits"),
    f"{_TM}.olmoe.modeling_olmoe.OlmoeTopKRouter": ("softmax", "norm_topk_prob", "logits"),
    f"{_TM}.mixtral.modeling_mixtral.MixtralTopKRouter": ("softmax", True, "float32"),
    f"{_TM}.gpt_oss.modeling_gpt_oss.GptOssTopKRouter": ("topk_softmax", True, "logits"),
}
_ORIGINAL = "_scattermoe_router_forward"
#: router class (dotted path) -> whether its first fused call matched the class's own forward
CHECKED: dict[str, bool] = {}
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
log = logging.getLogger("host_plugin_scattermoe")


def class_path(module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def install(model) -> int:
    """Give every router module of a class in :data:`SPECS` the fused forward; returns how many."""
    n = 0
    for m in model.modules():
        if (class_path(m) in SPECS and _ORIGINAL not in m.__dict__
                and isinstance(getattr(m, "weight", None), torch.Tensor)):
            m.__dict__[_ORIGINAL] = m.forward
            m.forward = types.MethodType(fused_forward, m)
            n += 1
    return n


def _is_plain(t: torch.Tensor) -> bool:
    return not hasattr(t, "_local_tensor")  # a DTensor (FSDP2, tensor parallel) keeps the module's forward


def compute_dtype(module, x: torch.Tensor) -> torch.dtype | None:
    """The dtype the module's ``F.linear`` computes the logits in: autocast's (HF Trainer's ``bf16: true`` runs the
    forward under autocast), else the input's when the weight (and bias) share it; None when the kernels take
    neither."""
    W = module.weight
    b = getattr(module, "bias", None)
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        return dt if dt in (torch.float16, torch.bfloat16) else None
    same = x.dtype == W.dtype and (b is None or b.dtype == W.dtype)
    if same and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return x.dtype
    return None


def fused_dtype(module, x: torch.Tensor, path: str) -> torch.dtype | None:
    """The dtype the fused router computes this call in (:func:`compute_dtype`), or None where the module's own forward
    runs (see the module docstring). ``path``: the module's :func:`class_path`."""
    from host_plugin_scattermoe import ops
    from host_plugin_scattermoe.router_kernels import MAX_EXPERTS, MAX_TOP_K

    W = module.weight
    backend = ops.SETTINGS["backend"]  # as the experts: auto runs Triton on CUDA, triton also under the interpreter
    runs = (
        ops.SETTINGS.get("fused_router", True)
        and (x.is_cuda if backend == "auto" else backend == "triton" and (x.is_cuda or _INTERPRET))
        and W.dim() == 2 and W.shape[0] <= MAX_EXPERTS
        and 0 < int(module.top_k) <= min(MAX_TOP_K, W.shape[0])
        # the Qwen/OLMoE/Mixtral routers flatten their input; gpt-oss's keeps its shape (its MLP passes [T, H])
        and (x.dim() == 2 or SPECS[path][0] == "softmax")
        and not parametrize.is_parametrized(module)
        and _is_plain(W)
        and not torch.compiler.is_compiling()
        and CHECKED.get(path, True)
    )
    return compute_dtype(module, x) if runs else None


def fused_forward(self, hidden_states: torch.Tensor):
    """``(router_logits [T, E], router_scores [T, k], router_indices [T, k])``, as the module's own forward returns."""
    own = self.__dict__[_ORIGINAL]
    path = class_path(self)
    dt = fused_dtype(self, hidden_states, path)
    if dt is None:
        return own(hidden_states)
    if path not in CHECKED:
        CHECKED[path] = _matches(self, own, hidden_states, path, dt)
        if not CHECKED[path]:
            return own(hidden_states)
        log.info("scattermoe: fused router on for %s (%s, matched its own forward)", type(self).__name__, dt)
    return _route(self, hidden_states, path, dt)


def _route(self, hidden_states, path: str, dt: torch.dtype):
    kind, norm, scores = SPECS[path]
    if isinstance(norm, str):
        norm = bool(getattr(self, norm))
    x = hidden_states.reshape(-1, self.weight.shape[1])
    W, b = self.weight, getattr(self, "bias", None)
    # autocast's casts of F.linear, as differentiable ops outside the node (a no-op where the dtypes agree)
    x, W = x.to(dt), W.to(dt)
    b = b.to(dt) if b is not None else None
    sdt = torch.float32 if scores == "float32" else dt
    with torch.autocast(hidden_states.device.type, enabled=False):
        return _RouterFunction.apply(x, W, b, kind == "topk_softmax", norm, int(self.top_k), sdt)


def _matches(module, own, hidden_states, path: str, dt: torch.dtype) -> bool:
    """The first fused call of a class, checked against the class's own forward on up to 256 tokens: logits within an
    ulp, the chosen experts a top-k of the module's logits, the same weights."""
    x = hidden_states.reshape(-1, module.weight.shape[1])[:256].detach()
    with torch.no_grad():
        ref_l, ref_s, ref_i = own(x)
        got_l, got_s, got_i = _route(module, x, path, dt)
    # the logits' ulp is that of the dtype they are computed in (autocast's, for an fp32 model), not the input's
    ulp = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dt]
    ok = ref_s.dtype == got_s.dtype and ref_s.shape == got_s.shape and ref_i.shape == got_i.shape
    if ok:
        scale = ref_l.float().abs().max().item()

        def close(a, b, rtol):
            return torch.allclose(a.float(), b.float(), rtol=rtol, atol=rtol * scale)

        ok = (
            close(ref_l, got_l, ulp)
            # the chosen experts are a top-k of the module's logits (at a tie either one is), weights alike
            and close(ref_l.gather(1, got_i).sort(1).values, ref_l.gather(1, ref_i).sort(1).values, ulp)
            and torch.allclose(ref_s.float().sort(1).values, got_s.float().sort(1).values, rtol=4 * ulp,
                               atol=ulp * 1e-2)
        )
    if not ok:
        warnings.warn(
            f"scattermoe: {type(module).__name__}'s forward no longer matches the fused router's formula (transformers "
            f"{_tf_version()}); it keeps its own forward. Set scattermoe_fused_router: false to silence this.",
            stacklevel=3,
        )
    return ok


def _tf_version() -> str:
    try:
        import transformers

        return transformers.__version__
    except Exception:  # noqa: BLE001
        return "?"


class _RouterFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, b, topk_first: bool, norm: bool, k: int, scores_dtype):
        from host_plugin_scattermoe import router_kernels as RK

        ctx.set_materialize_grads(False)  # an unused output (the logits, mostly) gets no zero-filled gradient
        logits, scores, ids = RK.route(x, W, b, k, 1 if topk_first else 0, norm, scores_dtype)
        ctx.save_for_backward(x, W, logits, ids)
        ctx.conf = (1 if topk_first else 0, norm)
        ctx.mark_non_differentiable(ids)
        return logits, scores, ids

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logits, g_scores, _g_ids):
        from host_plugin_scattermoe import router_kernels as RK

        x, W, logits, ids = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if g_scores is None:
            if g_logits is None:
                return None, None, None, None, None, None, None
            g_scores = torch.zeros(ids.shape, device=ids.device, dtype=logits.dtype)
        mode, norm = ctx.conf
        dx, dl = RK.backward(logits, g_scores, ids, g_logits, W, mode, norm, need_x, need_w or need_b)
        dW = dl.t().mm(x) if need_w else None
        db = dl.sum(0) if need_b else None
        return dx, dW, db, None, None, None, None
