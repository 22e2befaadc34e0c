"""What the kernel tests share, for this plugin's tests and for a plugin that builds on these kernels (mxfp4): where
the kernels run, the tolerances against the float64 reference, the error measure. Importing it imports the kernels,
so set ``TRITON_INTERPRET=1`` first on a machine without CUDA (the tests' ``conftest.py`` does)."""

from __future__ import annotations

import torch

from host_plugin_scattermoe import kernels as K
from host_plugin_scattermoe import reference

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


def float64_experts_reference(p: dict, names, grads, s1: float = 0.7, s2: float = 1.3, apply_gate=reference.glu):
    """A test problem's experts call in float64 through the torch reference (``reference.experts_forward``: separate
    ops, autograd), the oracle of the merged node's tests. ``p`` holds ``x``, the transposed ``W1``/``W2``, ``gates``,
    ``idx``, ``dout`` and optionally ``A1``/``B1``/``A2``/``B2`` (LoRA) and ``b1``/``b2`` (biases); ``names`` the
    leaves among them, ``grads`` those whose gradients come back: ``(output, {name: grad})``."""
    lv = {n: (p[n].detach().to(torch.float64).requires_grad_(n in grads) if p[n] is not None else None) for n in names}

    def lora(a, b, s):
        return (lv[a], lv[b], s) if lv.get(a) is not None else None

    out = reference.experts_forward(
        lv["x"], p["idx"], lv["gates"], lv["W1"], lv["W2"], transposed=True, apply_gate=apply_gate,
        gate_up_bias=lv.get("b1"), down_bias=lv.get("b2"),
        gate_up_lora=lora("A1", "B1", s1), down_lora=lora("A2", "B2", s2),
    )
    out.backward(p["dout"].double())
    return out.detach(), {n: lv[n].grad for n in grads}


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
