import os

# Must precede any import of liger-kernel's kernels (their @triton.jit decorators read it). On a CUDA
# machine the kernels run for real; the interpreter is switched on only where there is no GPU.
try:
    import torch

    _CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _CUDA = False
if not _CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


def _interpreter_float_scalars_as_fp32():
    """Compiled Triton passes a Python float kernel argument as an fp32 scalar; Triton's interpreter
    (3.9) passes the bare float, on which liger's kernels call ``.to(tl.float32)`` and fail. Convert
    it the way the compiler does, so the real kernels run on CPU."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    if getattr(interpreter._implicit_cvt, "_fp32_floats", False):
        return
    original = interpreter._implicit_cvt

    def convert(arg):
        if isinstance(arg, float):
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return original(arg)

    convert._fp32_floats = True
    interpreter._implicit_cvt = convert
    # The interpreter has no CUDA libdevice: its extern rsqrt returns None. Point liger's norm kernels at
    # Triton's own rsqrt (the same function, implemented by the interpreter).
    import importlib

    for name in ("rms_norm", "layer_norm"):
        importlib.import_module(f"liger_kernel.ops.{name}").rsqrt = _rsqrt


if os.environ.get("TRITON_INTERPRET") == "1":
    import triton
    import triton.language as tl

    @triton.jit
    def _rsqrt(x):
        return tl.rsqrt(x)

    _interpreter_float_scalars_as_fp32()


@pytest.fixture(autouse=True)
def _undo_liger_patches():
    """liger-kernel patches transformers process-wide; every test starts and ends unpatched."""
    yield
    from host_plugin_liger import patching

    patching.restore()


@pytest.fixture
def device():
    return "cuda" if _CUDA else "cpu"
