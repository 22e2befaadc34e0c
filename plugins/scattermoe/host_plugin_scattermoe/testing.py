"""What the kernel tests share, for this plugin's tests and for a plugin that builds on these kernels (mxfp4): where
the kernels run, the tolerances against the float64 reference, the error measure. Importing it imports the kernels,
so set ``TRITON_INTERPRET=1`` first on a machine without CUDA (the tests' ``conftest.py`` does)."""

from __future__ import annotations

import torch

from host_plugin_scattermoe import kernels as K

#: Triton can run here: a CUDA device, or the interpreter on the CPU.
TRITON_RUNS = bool(K.INTERPRET or torch.cuda.is_available())
#: Where the kernels run: the GPU, or the CPU under the interpreter.
DEV = "cuda" if torch.cuda.is_available() and not K.INTERPRET else "cpu"
#: Relative-error bounds against the float64 reference. No bf16 entry: the interpreter's bf16 math is wrong, so bf16
#: runs only in the GPU tests, with their own bounds.
TOL = {torch.float32: 1e-4, torch.float16: 5e-3}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` in float64 (0/0 reads as 0)."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def record_tma_descriptors(monkeypatch, small_tiles: bool = True) -> list:
    """Force TMA descriptors wherever an operand's layout allows (``TMA_MODE = "1"``) and return the list that every
    launch's ``_tma_descs`` result (``(w_desc, ...)``) is appended to, so a test can check the path it took.
    ``small_tiles``: under the interpreter one small tile, on a GPU the rule's cached-plan path from the first row."""
    if small_tiles:
        if K.INTERPRET:
            monkeypatch.setattr(K, "INTERP_S2S", {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 3})
        else:
            monkeypatch.setattr(K, "AUTOTUNE_MIN_ROWS", 1)
    monkeypatch.setattr(K, "TMA_MODE", "1")
    taken: list = []
    real = K._tma_descs
    monkeypatch.setattr(K, "_tma_descs", lambda *a: taken.append(real(*a)) or taken[-1])
    return taken
