"""The experts forward and backward as two CUDA graph replays (``scattermoe_cuda_graph``, off by default).

Why: at the small-expert shapes one MoE block's ~2.3 ms of GPU work takes the host 3-6 ms to enqueue
(Python autograd glue, ~16 kernel launches, cub's sort passes; ``bench/diagnose_gap.py``), so a
synchronised step waits on the CPU. Captured once per input shape, the experts call becomes: copy the
three inputs into static buffers, replay the forward graph, clone the output; its backward: copy the
output gradient, replay the backward graph, clone the gradients. Two replays instead of ~16 launches.

How it stays correct:

* One capture per ``(tokens, top_k, dtypes, requires_grad flags, parameter addresses, adapter
  state)``, at most ``MAX_GRAPHS_PER_MODULE`` per experts module; anything else (CPU, no grad,
  peft's unattached parametrisations, saved-tensor hooks, i.e. non-reentrant activation
  checkpointing or offloading, a capture underway, a new shape past the limit) runs the eager
  path. Reentrant checkpointing replays: its recompute runs with grad enabled and no hooks. Routing never syncs with the host (``routing.sort_tokens``), so expert loads may
  change freely between replays: only the token count fixes a graph.
* Outputs and gradients are cloned out of the graph's buffers, so ``.grad`` never aliases a buffer the
  next replay overwrites (gradient accumulation stays right).
* A second forward of the same graph before the first one's backward (two forwards, then one
  backward) would overwrite the saved activations: it runs eagerly instead.
* All graphs share one private memory pool. The forward's saved activations are kept alive
  (``retain_graph``; the merged experts node, ``ops.glu_experts``, which is captured like the eager path's and
  frees its ctx-held activations in an eager backward, keeps them when its forward was captured), so only
  capture-time temporaries are ever reused by a later capture; a replay
  can then only clobber memory of a graph that was captured later and is not between its own forward
  and backward, which holds for forward-then-reverse-backward order and for reentrant activation
  checkpointing's recompute-then-backward order.

Cost: the first call of each shape synchronises, runs two eager warm-up steps and captures (tens of
ms); each graph keeps its activations, its temporaries and three ``[T, H]`` buffers (input, output,
output gradient) resident, ~50 MB per MoE layer at T = 4096, H = 2048 on top of the eager path.
"""

from __future__ import annotations

import os
import threading
import weakref

import torch
from torch.nn.utils import parametrize

from host_plugin_scattermoe.lora import _WRAPPERS_ATTR

MAX_GRAPHS_PER_MODULE = int(os.environ.get("SCATTERMOE_MAX_GRAPHS", "4"))
_GRAPHS_ATTR = "_scattermoe_graphs"
_PARAMS_ATTR = "_scattermoe_graph_params"
_POOL = None
#: Replays so far (forward, backward): lets tests and benches see that the graphs ran.
REPLAYS = {"fwd": 0, "bwd": 0}
_LOCAL = threading.local()


class _Token:
    """Lives on the autograd node of one replayed forward: dead once that node is freed."""


def _pool():
    global _POOL
    if _POOL is None:
        _POOL = torch.cuda.graph_pool_handle()
    return _POOL


def capturing() -> bool:
    return getattr(_LOCAL, "capturing", False)


def _params(module, state: tuple) -> list[torch.Tensor]:
    """Every parameter the experts forward may read: the module's own and the linked peft wrappers' (LoRA
    factors), cached per adapter state (walking the nested wrappers costs more host time than a replay)."""
    cached = module.__dict__.get(_PARAMS_ATTR)
    if cached is not None and cached[0] == state:
        return cached[1]
    seen, out = set(), []
    wrappers = getattr(module, _WRAPPERS_ATTR, None) or {}
    for src in (module, *wrappers.values()):
        for p in src.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    module.__dict__[_PARAMS_ATTR] = (state, out)
    return out


def _saved_tensor_hooks_active() -> bool:
    """Non-reentrant activation checkpointing and activation offloading pack saved tensors through hooks;
    a replay saves none, so under such hooks the experts run eagerly."""
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(True) is not None
    except Exception:  # pragma: no cover - private API moved: assume hooks, stay eager
        return True


def _adapter_state(module) -> tuple:
    wrappers = getattr(module, _WRAPPERS_ATTR, None) or {}
    return tuple(
        (name, bool(getattr(w, "disable_adapters", False)), bool(getattr(w, "merged", False)),
         tuple(w.active_adapters), tuple(sorted((a, float(s)) for a, s in w.scaling.items())))
        for name, w in sorted(wrappers.items())
    )


def applies(module, hidden_states: torch.Tensor) -> bool:
    from host_plugin_scattermoe import ops

    return (
        ops.SETTINGS.get("cuda_graph", False)
        and hidden_states.is_cuda
        and torch.is_grad_enabled()
        and not capturing()
        and not torch.cuda.is_current_stream_capturing()
        and not parametrize.is_parametrized(module)
        and not _saved_tensor_hooks_active()
    )


class _Entry:
    def __init__(self, module, eager, x, idx, gates, leaves):
        self.leaves = leaves
        self.sx = x.detach().clone().requires_grad_(x.requires_grad)
        self.sidx = idx.detach().clone()
        self.sg = gates.detach().clone().requires_grad_(gates.requires_grad)
        self.diff = [t for t in (self.sx, self.sg, *leaves) if t.requires_grad]
        self.pending = None
        torch.cuda.synchronize()
        _LOCAL.capturing = True
        # the experts path casts explicitly; autocast stays out of the captured work (and its cache)
        with torch.autocast("cuda", enabled=False):
            self._capture(module, eager, x)

    def _capture(self, module, eager, x):
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up: Triton compiles, cub/cuBLAS workspaces, tile picks
                for _ in range(2):
                    out = eager(module, self.sx, self.sidx, self.sg)
                    if self.diff and out.requires_grad:
                        torch.autograd.grad(out, self.diff, torch.ones_like(out), allow_unused=True)
                    del out
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            self.fwd = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.fwd, pool=_pool(), capture_error_mode="thread_local"):
                self.out = eager(module, self.sx, self.sidx, self.sg)
            self.gout = torch.empty_like(self.out)
            self.grads = None
            if self.diff and self.out.requires_grad:
                self.bwd = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.bwd, pool=_pool(), capture_error_mode="thread_local"):
                    # retain_graph: the saved activations stay allocated, so no later capture reuses them
                    self.grads = torch.autograd.grad(self.out, self.diff, self.gout, retain_graph=True, allow_unused=True)
        finally:
            _LOCAL.capturing = False

    def busy(self) -> bool:
        return self.pending is not None and self.pending() is not None


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, entry, x, idx, gates, *leaves):
        entry.sx.copy_(x)
        entry.sidx.copy_(idx)
        entry.sg.copy_(gates)
        entry.fwd.replay()
        REPLAYS["fwd"] += 1

        ctx.token = _Token()
        entry.pending = weakref.ref(ctx.token)
        ctx.entry = entry
        return entry.out.detach().clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout):
        entry = ctx.entry
        entry.gout.copy_(gout)
        entry.bwd.replay()
        REPLAYS["bwd"] += 1
        entry.pending = None
        by_id = {id(t): g for t, g in zip(entry.diff, entry.grads)}

        def grad(t):
            g = by_id.get(id(t))
            return None if g is None else g.clone()

        return (None, grad(entry.sx), None, grad(entry.sg), *(grad(p) for p in entry.leaves))


def run(module, eager, hidden_states, top_k_index, top_k_weights):
    """``eager(module, x, idx, gates)`` through a cached pair of CUDA graphs, or eagerly when a graph
    cannot be used (see the module docstring)."""
    state = _adapter_state(module)
    params = _params(module, state)
    leaves = [p for p in params if p.requires_grad]
    key = (
        tuple(hidden_states.shape), tuple(top_k_index.shape), hidden_states.dtype, top_k_weights.dtype,
        top_k_index.dtype, hidden_states.requires_grad, top_k_weights.requires_grad,
        tuple((p.data_ptr(), p.requires_grad) for p in params), state, _settings_key(),
    )
    graphs = module.__dict__.setdefault(_GRAPHS_ATTR, {})
    entry = graphs.get(key)
    if entry is None:
        if len(graphs) >= MAX_GRAPHS_PER_MODULE:
            return eager(module, hidden_states, top_k_index, top_k_weights)
        entry = graphs[key] = _Entry(module, eager, hidden_states, top_k_index, top_k_weights, leaves)
    if entry.busy() or (entry.grads is None and (hidden_states.requires_grad or top_k_weights.requires_grad or leaves)):
        return eager(module, hidden_states, top_k_index, top_k_weights)
    return _Replay.apply(entry, hidden_states, top_k_index, top_k_weights, *leaves)


def _settings_key() -> tuple:
    from host_plugin_scattermoe import ops

    return tuple(sorted((k, v) for k, v in ops.SETTINGS.items() if k != "cuda_graph"))


def release(module) -> None:
    """Drop a module's captured graphs (their memory returns to the pool)."""
    module.__dict__.pop(_GRAPHS_ATTR, None)
    module.__dict__.pop(_PARAMS_ATTR, None)
