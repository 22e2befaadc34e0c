"""Direct launches of already-compiled Triton kernels (host time of the eager step, issue 16).

``kernel[grid](*args, **kw)`` costs ~39 µs of host time per ``_s2s_kernel`` launch in Triton 3.6's
``JITFunction.run`` (binding ~45 arguments, specialising each, building and hashing the cache key, the
launch-metadata and hook plumbing) before the C launcher runs. On a repeated launch none of that changes: the
same plan (tiles, constexpr flags, grid) and arguments of the same kinds select the same ``CompiledKernel``.

:func:`launch` keeps, per caller-held ``slot`` (one per launch plan), the compiled kernel the first normal launch
returned, keyed by :func:`spec_key` of the runtime arguments, and on a hit calls its C launcher directly with
exactly the arguments ``JITFunction.run`` passes it (the runtime arguments, then the constexpr values in parameter
order). The key is at least as fine as Triton's own specialisation (ints by exact value, tensors by dtype and
16-byte alignment, tensor descriptors by dtype, block shape and padding), so a hit always runs the kernel the
normal path would have picked. Anything unexpected (another Triton API, launch hooks installed, a profiler, an
argument of another kind, another device) takes the normal path; ``SCATTERMOE_DIRECT_LAUNCH=0`` turns it off.
Under ``TRITON_INTERPRET=1`` it is never used.
"""

from __future__ import annotations

import os

import torch

ENABLED = os.environ.get("SCATTERMOE_DIRECT_LAUNCH", "1") == "1" and os.environ.get("TRITON_INTERPRET", "0") != "1"
#: entries per slot (argument kinds seen for one plan); cleared when full
MAX_SPECS = 64

try:  # Triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

_Tensor = torch.Tensor
_RT = None  # triton.knobs.runtime (None: no knobs module, hooks read as idle only if absent)
_DRIVER = None  # (get_current_device, get_current_stream)


class _Entry:
    __slots__ = ("run", "function", "packed", "tail", "device")

    def __init__(self, run, function, packed, tail, device):
        self.run, self.function, self.packed, self.tail, self.device = run, function, packed, tail, device


class _NoKey(Exception):
    pass


def _arg_key(a):
    t = type(a)
    if t is int:
        return a  # exact value: finer than Triton's (== 1, % 16, 32/64-bit range)
    if t is float:
        return float  # fp32 scalar, never specialised on its value
    if t is bool:
        return (bool, a)
    if a is None:
        return None
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() & 15 == 0)
    if TensorDescriptor is not None and t is TensorDescriptor:
        return (TensorDescriptor, a.base.dtype, tuple(a.block_shape), a.padding, a.strides[-1])
    raise _NoKey


def spec_key(args) -> tuple | None:
    """A hashable key of the runtime arguments that is at least as fine as Triton's specialisation of them;
    ``None`` when an argument is of a kind this module does not know (the normal launch path is taken)."""
    try:
        return tuple([
            a if type(a) is int else (a.dtype, a.data_ptr() & 15 == 0) if type(a) is _Tensor else _arg_key(a)
            for a in args
        ])
    except _NoKey:
        return None


def _hooks_idle() -> bool:
    """No launch enter/exit hooks (profilers such as proton install them): the direct launch skips them."""
    rt = _RT
    if rt is None:
        return True
    for h in (rt.launch_enter_hook, rt.launch_exit_hook):
        # a hook chain with an empty ``calls`` list is idle; any other hook object counts as installed
        if h is not None and getattr(h, "calls", True):
            return False
    return True


def _make_entry(kernel, compiled, n_runtime: int, kw: dict):
    """The direct-launch entry for ``compiled`` (what ``kernel[grid](...)`` returned), or None when this Triton's
    objects do not look like 3.x's (the normal path is then always taken for this key)."""
    global _RT, _DRIVER
    try:
        if getattr(kernel, "pre_run_hooks", None):
            return None
        run = compiled.run  # CudaLauncher (loads the module on first access; the normal launch did it)
        function, packed = compiled.function, compiled.packed_metadata
        if function is None or not callable(run):
            return None
        params = kernel.params
        if len(params) < n_runtime or any(p.is_constexpr for p in params[:n_runtime]):
            return None
        tail = []
        for p in params[n_runtime:]:
            if not p.is_constexpr:
                return None
            if p.name in kw:
                tail.append(kw[p.name])
            elif p.has_default:
                tail.append(p.default)
            else:
                return None
        if _DRIVER is None:
            from triton.runtime.driver import driver

            _DRIVER = (driver.active.get_current_device, driver.active.get_current_stream)
            try:
                from triton import knobs

                _RT = knobs.runtime
            except ImportError:  # pragma: no cover - Triton without knobs: no hooks to honour
                _RT = None
        return _Entry(run, function, packed, tuple(tail), _DRIVER[0]())
    except Exception:  # noqa: BLE001 - any API mismatch: keep the normal path
        return None


def launch(kernel, grid: tuple, args: tuple, kw: dict, slot: dict | None) -> None:
    """``kernel[grid](*args, **kw)``; ``grid`` a 3-tuple, ``args`` every runtime (non-constexpr) argument in
    parameter order, ``kw`` the constexprs and launch options (fixed for ``slot``: one slot per launch plan)."""
    if slot is None or not ENABLED:
        kernel[grid](*args, **kw)
        return
    key = spec_key(args)
    ent = slot.get(key) if key is not None else None
    if ent is not None and ent is not False and _hooks_idle():
        get_device, get_stream = _DRIVER
        dev = get_device()
        if dev == ent.device:
            ent.run(grid[0], grid[1], grid[2], get_stream(dev), ent.function, ent.packed, None, None, None,
                    *args, *ent.tail)
            return
    compiled = kernel[grid](*args, **kw)
    if key is not None and ent is None:
        if len(slot) >= MAX_SPECS:
            slot.clear()
        made = _make_entry(kernel, compiled, len(args), kw)
        slot[key] = made if made is not None else False
