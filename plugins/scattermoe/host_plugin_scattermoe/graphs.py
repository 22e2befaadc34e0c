"""The MoE block's forward and backward as two CUDA graph replays (``scattermoe_cuda_graph``, off by default).

Why: at the small-expert shapes one MoE block's ~2.3 ms of GPU work takes the host 3-6 ms to enqueue
(Python autograd glue, ~16 kernel launches, cub's sort passes; ``bench/diagnose_gap.py``), so a
synchronised step waits on the CPU. Captured once per input shape, the call becomes: copy the inputs
into static buffers, replay the forward graph, clone the outputs; its backward: copy the output
gradients, replay the backward graph, clone the gradients. Two replays instead of ~16 launches.

What is captured: the whole MoE block (the module whose child is the experts: router, experts, a shared
expert, the glue between them; :func:`install`), so the GPU's first kernel is the replay's, not the router's
after the block's Python. Where the block cannot be captured (a forward hook or pre-hook on any module
inside it, e.g. transformers' ``output_router_logits`` recorder once installed; keyword or non-tensor
arguments; a peft wrapper scattermoe has not linked; another experts implementation), the block runs its
own forward and the experts call alone is replayed, as below.

How it stays correct:

* One capture per ``(input shapes, dtypes, requires_grad flags, parameter addresses, adapter state,
  autocast state, train/eval)``, at most ``MAX_GRAPHS_PER_MODULE`` per module; anything else (CPU, no grad,
  peft's unattached parametrisations, saved-tensor hooks, i.e. non-reentrant activation
  checkpointing or offloading, a capture underway, a new shape past the limit) runs the eager
  path. Reentrant checkpointing replays: its recompute runs with grad enabled and no hooks. Routing never
  syncs with the host (``routing.sort_tokens``), so expert loads may change freely between replays: only
  the token count fixes a graph.
* Outputs and gradients are cloned out of the graph's buffers, so ``.grad`` never aliases a buffer the
  next replay overwrites (gradient accumulation stays right).
* A second forward of the same graph before the first one's backward (two forwards, then one
  backward) would overwrite the saved activations: it runs eagerly instead (a block's: all of it,
  with no experts graph captured inside it).
* A capture that CUDA refuses warns once; every later call then runs eagerly.
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

import logging
import os
import threading
import warnings
import weakref

import torch
from torch.nn.utils import parametrize

from host_plugin_scattermoe.lora import _WRAPPERS_ATTR

log = logging.getLogger("host_plugin_scattermoe")
MAX_GRAPHS_PER_MODULE = int(os.environ.get("SCATTERMOE_MAX_GRAPHS", "4"))
_GRAPHS_ATTR = "_scattermoe_graphs"
_PARAMS_ATTR = "_scattermoe_graph_params"
_POOL = None
#: Replays so far (forward, backward): lets tests and benches see that the graphs ran.
REPLAYS = {"fwd": 0, "bwd": 0}
_LOCAL = threading.local()
#: Why a capture failed (then nothing is captured any more), or None.
_FAILED: str | None = None
_SAID: set = set()


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


def _adapter_state(tuners) -> tuple:
    """What a capture depends on in each peft layer: enabled, merged, the active adapters and their scalings."""
    return tuple(
        (bool(getattr(w, "disable_adapters", False)), bool(getattr(w, "merged", False)),
         tuple(w.active_adapters), tuple(sorted((a, float(s)) for a, s in w.scaling.items())))
        for w in tuners
    )


def applies(module, hidden_states: torch.Tensor) -> bool:
    from host_plugin_scattermoe import ops

    return (
        ops.SETTINGS.get("cuda_graph", False)
        and hidden_states.is_cuda
        and torch.is_grad_enabled()
        and not capturing()
        and not getattr(_LOCAL, "eager", False)
        and _FAILED is None
        and not torch.cuda.is_current_stream_capturing()
        and not parametrize.is_parametrized(module)
        and not _saved_tensor_hooks_active()
    )


class _Entry:
    """One captured pair of graphs: ``fn(*args)`` forward, and its backward to the args and ``leaves``."""

    def __init__(self, fn, args, leaves, autocast):
        self.leaves = leaves
        self.args = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
        self.diff = [t for t in (*self.args, *leaves) if t.requires_grad]
        self.pending = None
        torch.cuda.synchronize()
        _LOCAL.capturing = True
        # autocast as the caller's (None: off, for the experts path, which casts explicitly), without its weight-cast
        # cache: a cached cast made inside a capture would live in the graph's pool
        dt = autocast or torch.get_autocast_dtype("cuda")
        with torch.autocast("cuda", dtype=dt, enabled=autocast is not None, cache_enabled=False):
            self._capture(fn)

    def _capture(self, fn):
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up: Triton compiles, cub/cuBLAS workspaces, tile picks
                for _ in range(2):
                    outs = [o for o in _flat(fn(*self.args))[0] if o is not None and o.requires_grad]
                    if self.diff and outs:
                        torch.autograd.grad(outs, self.diff, [torch.ones_like(o) for o in outs], allow_unused=True)
                    del outs
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            self.fwd = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.fwd, pool=_pool(), capture_error_mode="thread_local"):
                self.outs, self.spec = _flat(fn(*self.args))
            self.out_diff = [o is not None and o.requires_grad for o in self.outs]
            diff_outs = [o for o, d in zip(self.outs, self.out_diff) if d]
            self.gouts = [torch.empty_like(o) for o in diff_outs]
            self.grads = None
            if self.diff and diff_outs:
                self.bwd = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.bwd, pool=_pool(), capture_error_mode="thread_local"):
                    # retain_graph: the saved activations stay allocated, so no later capture reuses them
                    self.grads = torch.autograd.grad(diff_outs, self.diff, self.gouts, retain_graph=True,
                                                     allow_unused=True)
        finally:
            _LOCAL.capturing = False

    def busy(self) -> bool:
        return self.pending is not None and self.pending() is not None


def _flat(out):
    """``(tensors, rebuild)``: a tensor, or a tuple/list of tensors and Nones (e.g. gpt-oss's ``(out, scores)``)."""
    if isinstance(out, torch.Tensor):
        return [out], None
    if isinstance(out, (tuple, list)) and all(o is None or isinstance(o, torch.Tensor) for o in out):
        return list(out), type(out)
    raise _NotCapturable(f"an output of type {type(out).__name__}")


class _NotCapturable(Exception):
    """The forward returned something a replay cannot hand back: that module runs eagerly from then on."""


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, entry, *tensors):
        for static, t in zip(entry.args, tensors):
            static.copy_(t)
        entry.fwd.replay()
        REPLAYS["fwd"] += 1

        ctx.token = _Token()
        entry.pending = weakref.ref(ctx.token)
        ctx.entry = entry
        outs = tuple(None if o is None else o.detach().clone() for o in entry.outs)
        ctx.mark_non_differentiable(*(o for o, d in zip(outs, entry.out_diff) if o is not None and not d))
        return outs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *gouts):
        entry = ctx.entry
        for buf, g in zip(entry.gouts, (g for g, d in zip(gouts, entry.out_diff) if d)):
            buf.copy_(g)
        entry.bwd.replay()
        REPLAYS["bwd"] += 1
        entry.pending = None
        by_id = {id(t): g for t, g in zip(entry.diff, entry.grads)}

        def grad(t):
            g = by_id.get(id(t))
            return None if g is None else g.clone()

        return (None, *(grad(t) for t in (*entry.args, *entry.leaves)))


def _replay(module, fn, args, params, state, autocast):
    """``fn(*args)`` through the module's cached graphs, or None where it must run eagerly."""
    leaves = [p for p in params if p.requires_grad]
    key = (
        tuple((tuple(a.shape), a.dtype, a.requires_grad) for a in args),
        tuple((p.data_ptr(), p.requires_grad) for p in params), state, _settings_key(), autocast, module.training,
    )
    graphs = module.__dict__.setdefault(_GRAPHS_ATTR, {})
    entry = graphs.get(key)
    if entry is None:
        if graphs is _NEVER or len(graphs) >= MAX_GRAPHS_PER_MODULE:
            return None
        try:
            entry = _Entry(fn, args, leaves, autocast)
        except _NotCapturable:
            module.__dict__[_GRAPHS_ATTR] = _NEVER
            return None
        except RuntimeError as exc:
            # a capture CUDA refused: the step goes on eagerly, and so does every later call (a failed capture can
            # leave the graph pool unusable for the next one)
            global _FAILED
            _FAILED = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            warnings.warn(f"scattermoe: the CUDA graph capture of {type(module).__name__} failed ({_FAILED}); every "
                          "MoE layer runs eagerly from now on. Set scattermoe_cuda_graph: false to skip the attempt.",
                          stacklevel=3)
            return None
        graphs[key] = entry
        said = (type(module).__name__, key[0])
        if said not in _SAID:  # once per class and input shape, not per layer
            _SAID.add(said)
            log.info("scattermoe: CUDA graphs captured for each %s, inputs %s (a module holds at most %d)", said[0],
                     [tuple(a.shape) for a in args], MAX_GRAPHS_PER_MODULE)
    if entry.busy() or (entry.grads is None and any(a.requires_grad for a in (*args, *leaves))):
        return None
    outs = _Replay.apply(entry, *args, *leaves)
    return outs[0] if entry.spec is None else entry.spec(outs)


#: The graph dict of a module whose forward cannot be replayed (nothing is ever added to it).
_NEVER: dict = {}


def run(module, eager, hidden_states, top_k_index, top_k_weights):
    """``eager(module, x, idx, gates)`` (the experts call) through a cached pair of CUDA graphs, or eagerly when a
    graph cannot be used (see the module docstring)."""
    wrappers = getattr(module, _WRAPPERS_ATTR, None) or {}
    state = _adapter_state(w for _, w in sorted(wrappers.items()))
    params = _params(module, state)
    args = (hidden_states, top_k_index, top_k_weights)
    out = _replay(module, lambda *a: eager(module, *a), args, params, state, None)
    return eager(module, *args) if out is None else out


def _settings_key() -> tuple:
    from host_plugin_scattermoe import ops

    return tuple(sorted((k, v) for k, v in ops.SETTINGS.items() if k != "cuda_graph"))


def release(module) -> None:
    """Drop a module's captured graphs (their memory returns to the pool)."""
    module.__dict__.pop(_GRAPHS_ATTR, None)
    module.__dict__.pop(_PARAMS_ATTR, None)
    module.__dict__.pop(_BLOCK_ATTR, None)


# ---- the MoE block -------------------------------------------------------------------------------------------------

_OWN_FORWARD = "_scattermoe_own_forward"
_EXPERTS_ATTR = "_scattermoe_block_experts"
_BLOCK_ATTR = "_scattermoe_block_walk"


def install(model) -> int:
    """Give every MoE block (a module with an experts child, peft-wrapped or not) the graph-replaying forward; it
    runs the block's own forward unless ``ops.SETTINGS["cuda_graph"]`` is on and the block can be captured. Returns
    how many blocks it wrapped."""
    import types

    from host_plugin_scattermoe.lora import _chain, _is_experts_module

    n = 0
    for block in model.modules():
        if _chain(block):  # peft's wrappers around the experts are not the block
            continue
        for child in block.children():
            chain = _chain(child)
            base = chain[-1].base_layer if chain else child
            if _is_experts_module(base) and _OWN_FORWARD not in block.__dict__:
                block.__dict__[_EXPERTS_ATTR] = base
                block.__dict__[_OWN_FORWARD] = block.forward
                block.forward = types.MethodType(block_forward, block)
                n += 1
    return n


def _walk(block):
    """``(modules, parameters, unlinked, adapter state)`` inside the block, cached until its children or its adapter
    state change (peft's ``add_adapter`` adds parameters inside the same modules). A module that peft wraps deeper
    inside the block after its first capture needs :func:`release`."""
    from host_plugin_scattermoe.lora import _param_wrapper_cls

    children = tuple(map(id, block.children()))
    cached = block.__dict__.get(_BLOCK_ATTR)
    if cached is not None and cached[0] == children:
        tuners, walk = cached[1], cached[2]
        if _adapter_state(tuners) == walk[3]:
            return walk
    modules = list(block.modules())[1:]
    tuners = [m for m in modules if hasattr(m, "active_adapters") and hasattr(m, "scaling")]
    PW = _param_wrapper_cls()
    # a peft ParamWrapper that lora.attach did not link runs peft's own forward (parametrisations made per call)
    unlinked = PW is not None and any(isinstance(m, PW) and "forward" not in m.__dict__ for m in modules)
    walk = (modules, list(block.parameters()), unlinked, _adapter_state(tuners))
    block.__dict__[_BLOCK_ATTR] = (children, tuners, walk)
    return walk


def _hooked(modules) -> bool:
    from torch.nn.modules import module as nn_module

    return bool(
        nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks or nn_module._global_backward_hooks
        or getattr(nn_module, "_global_backward_pre_hooks", None)
        or any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in modules)
    )


def block_forward(self, *args, **kwargs):
    """The block's forward, replayed from CUDA graphs where it can be (module docstring)."""
    own = self.__dict__[_OWN_FORWARD]
    if (
        kwargs or not args or not all(isinstance(a, torch.Tensor) for a in args)
        or not applies(self, args[0])  # first: with scattermoe_cuda_graph off it returns at its first check
        or getattr(getattr(self.__dict__[_EXPERTS_ATTR], "config", None), "_experts_implementation", None)
        != "scattermoe"
    ):
        return own(*args, **kwargs)
    modules, params, unlinked, state = _walk(self)
    if unlinked or _hooked(modules):
        return own(*args)
    autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
    out = _replay(self, own, args, params, state, autocast)
    if out is not None:
        return out
    # busy (a second forward before the first one's backward) or past the graph limit: all eager, no experts graph,
    # whose capture could take memory that this block's graphs use as temporaries while it is still needed
    _LOCAL.eager = True
    try:
        return own(*args)
    finally:
        _LOCAL.eager = False
