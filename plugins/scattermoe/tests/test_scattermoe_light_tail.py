"""The merged experts node's light tail (``ops.glu_experts``, ``SETTINGS["light_tail"]``): the combine's backward folded
into the launches around it, the expert outputs ``y`` not kept from the forward. Both variants: ``"glu"`` (the dX
launch fed ``dout`` gathered, gate scaling and the routing-weight gradient in the SiLU-GLU backward kernel,
``kernels.silu_glu_gate_bwd``) and ``"gemm"`` (both in the dX launch's epilogue, ``kernels.glu_down_dx(glu=False)``,
against the saved activation).

Against the float64 torch reference and against the old backward (``light_tail`` off: ``combine_bwd`` over the kept
``y``, equal within fp32 rounding): output, dx, every LoRA gradient and dgates, fused / split / no LoRA, top_k 1/2/8,
idle experts, several row and column blocks, TMA descriptors, the int64 variant, fp32 and fp16 (interpreter on CPU,
native on CUDA); and where the old backward still runs (trainable down weight, no gradient into the up projection,
an activation wider than ``y`` kept only for dgates)."""

import weakref

import pytest
import torch

from host_plugin_scattermoe import kernels as K
from host_plugin_scattermoe import ops, reference
from host_plugin_scattermoe.routing import sort_tokens
from host_plugin_scattermoe.testing import DEV, TOL, TRITON_RUNS, float64_experts_reference, record_tma_descriptors, rel

pytestmark = pytest.mark.skipif(not TRITON_RUNS, reason="Triton needs CUDA or TRITON_INTERPRET=1")
NAMES = ("x", "W1", "W2", "A1", "B1", "A2", "B2", "gates")


def problem(T, E, H, I, k, r, dtype, seed=0, idle=(1,)):
    """Kernel-layout weights (``W1 [E, H, 2I]``, ``W2 [E, I, H]`` as transposed views of transformers' layout), LoRA
    factors ``A [E, r, in]``, ``B [E, out, r]`` (fp32, as peft keeps them), fp32 routing weights, routing that never
    picks the experts in ``idle``."""
    g = torch.Generator().manual_seed(seed)

    def rn(*s, scale=1.0, dt=dtype):
        return (torch.randn(*s, generator=g) * scale).to(DEV, dt)

    allowed = torch.tensor([e for e in range(E) if e not in idle])
    idx = allowed[torch.rand(T, allowed.numel(), generator=g).topk(k, dim=1).indices].to(DEV)
    p = dict(
        x=rn(T, H),
        W1=rn(E, 2 * I, H, scale=H**-0.5).transpose(1, 2),
        W2=rn(E, H, I, scale=I**-0.5).transpose(1, 2),
        A1=rn(E, r, H, scale=H**-0.5, dt=torch.float32) if r else None,
        B1=rn(E, 2 * I, r, scale=0.5, dt=torch.float32) if r else None,
        A2=rn(E, r, I, scale=I**-0.5, dt=torch.float32) if r else None,
        B2=rn(E, H, r, scale=0.5, dt=torch.float32) if r else None,
        gates=torch.rand(T, k, generator=g).to(DEV),
    )
    p["dout"] = rn(T, H)
    p["idx"], p["routing"] = idx, sort_tokens(idx, E)
    p["k"] = k
    return p


MODES = ["glu", "gemm"]


def run(p, grads, light, s1=0.7, s2=1.3, fused_lora=True, spy=None):
    """glu_experts forward + backward with ``light_tail = light``; returns (out, {name: grad}); ``spy``: a list that
    records the tail kernels that ran (``"glu"``: silu_glu_gate_bwd, ``"gemm"``: glu_down_dx(glu=False), ``"old"``:
    combine_bwd)."""
    leaves = {n: (p[n].detach().clone().requires_grad_(n in grads) if p[n] is not None else None) for n in NAMES}
    sei, ssi, offs = p["routing"]
    l1 = (leaves["A1"], leaves["B1"], s1) if leaves["A1"] is not None else None
    l2 = (leaves["A2"], leaves["B2"], s2) if leaves["A2"] is not None else None
    old = dict(ops.SETTINGS)
    ops.SETTINGS.update(light_tail=light, backend="triton")
    real = K.glu_down_dx, K.silu_glu_gate_bwd, K.combine_bwd
    try:
        if spy is not None:
            K.glu_down_dx = lambda *a, **kw: spy.append("gemm" if not kw.get("glu", True) else "?") or real[0](*a, **kw)
            K.silu_glu_gate_bwd = lambda *a, **kw: spy.append("glu") or real[1](*a, **kw)
            K.combine_bwd = lambda *a, **kw: spy.append("old") or real[2](*a, **kw)
        out = ops.glu_experts(leaves["x"], leaves["W1"], leaves["W2"], p["k"], sei, ssi, offs, l1, l2, leaves["gates"],
                              fused_lora=fused_lora)
        out.backward(p["dout"])
    finally:
        K.glu_down_dx, K.silu_glu_gate_bwd, K.combine_bwd = real
        ops.SETTINGS.clear()
        ops.SETTINGS.update(old)
    return out.detach(), {n: leaves[n].grad for n in grads}


def run_reference(p, grads):
    """The same in float64 through the torch reference (separate ops, autograd)."""
    return float64_experts_reference(p, NAMES, grads)


LORA_GRADS = ("x", "A1", "B1", "A2", "B2", "gates")
# (T, E, H, I, top_k, rank, LoRA path): E not a power of two, odd H/I, expert 1 idle
CASES = [
    (9, 5, 33, 19, 1, 4, "fused"),
    (11, 7, 40, 27, 2, 8, "fused"),
    (6, 11, 19, 33, 8, 16, "split"),
    (13, 6, 35, 24, 2, 4, "split"),
    (13, 6, 35, 24, 2, 0, "none"),
]


@pytest.mark.parametrize("light", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T%d-E%d-H%d-I%d-k%d-r%d-%s" % c)
def test_light_tail_matches_reference_and_old_backward(case, dtype, light):
    T, E, H, I, k, r, mode = case
    p = problem(T, E, H, I, k, r, dtype, seed=T + k)
    grads = LORA_GRADS if r else ("x", "gates")
    spy = []
    out, g = run(p, grads, light, fused_lora=mode != "split", spy=spy)
    assert spy == [light], "the light tail's kernel ran once, the combine backward not"
    spy = []
    out_old, g_old = run(p, grads, "0", fused_lora=mode != "split", spy=spy)
    assert spy == ["old"]
    want, g_ref = run_reference(p, grads)
    assert torch.equal(out, out_old)  # same forward kernels
    assert rel(out, want) < TOL[dtype]
    for n in grads:
        assert g[n] is not None and g[n].dtype == p[n].dtype, n
        assert rel(g[n], g_ref[n]) < TOL[dtype], (n, rel(g[n], g_ref[n]))
        if dtype == torch.float32:  # the old backward: the same sums, g applied before instead of after the GEMM
            assert rel(g[n], g_old[n]) < 1e-5, (n, rel(g[n], g_old[n]))
    assert g["gates"].dtype == torch.float32  # the router's gradient stays fp32
    if r:  # the idle expert's factors get exact zeros
        for n in ("A1", "B1", "A2", "B2"):
            assert g[n][1].abs().max() == 0, n


@pytest.mark.parametrize("light", MODES)
@pytest.mark.parametrize("grads", [("x",), ("A1", "B1"), ("x", "A2", "gates"), ("B2", "B1")], ids="-".join)
def test_light_tail_gradient_subsets(grads, light):
    """Only some leaves train (no dgates: the kernels without the reduction; no dA2: no rank write): each gradient
    still matches the reference."""
    p = problem(11, 7, 40, 27, 2, 8, torch.float32, seed=4)
    spy = []
    _, g = run(p, grads, light, spy=spy)
    assert spy == [light]
    _, g_ref = run_reference(p, grads)
    for n in grads:
        assert rel(g[n], g_ref[n]) < 1e-4, n


@pytest.mark.parametrize("light", MODES)
def test_light_tail_several_row_and_column_blocks(monkeypatch, light):
    """Small tiles: several column blocks (dgates is a sum of per-column-block partials: of the dX launch for "gemm",
    of the GLU-backward kernel for "glu") and several row blocks per expert, fused and split LoRA."""
    monkeypatch.setattr(K, "_glu_block", lambda I: 16)
    if K.INTERPRET:
        monkeypatch.setattr(K, "INTERP_S2S", {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 3})
        monkeypatch.setattr(K, "INTERP_OUTER", {"BLOCK_M": 16, "BLOCK_P": 16, "BLOCK_Q": 16})
    else:
        monkeypatch.setattr(K, "FORCE", {"s2s": K._cfg(16, 16, 16, 3, 4, 2)})
    p = problem(40, 3, 70, 45, 2, 8, torch.float32, seed=5, idle=())
    for split in (False, True):
        _, g = run(p, LORA_GRADS, light, fused_lora=not split)
        _, g_old = run(p, LORA_GRADS, "0", fused_lora=not split)
        _, g_ref = run_reference(p, LORA_GRADS)
        for n in LORA_GRADS:
            assert rel(g[n], g_ref[n]) < 1e-4, (n, split)
            assert rel(g[n], g_old[n]) < 1e-5, (n, split)


@pytest.mark.parametrize("light", MODES)
def test_light_tail_tma_descriptors(monkeypatch, light):
    """TMA descriptors wherever the layout allows (the light launch reads W_down through one; dout is gathered)."""
    if not K.INTERPRET and not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9):
        pytest.skip("needs the interpreter or a Hopper-class GPU")
    taken = record_tma_descriptors(monkeypatch)
    p = problem(24, 5, 72, 40, 2, 8, torch.float32, seed=11)
    _, g = run(p, LORA_GRADS, light)
    _, g_ref = run_reference(p, LORA_GRADS)
    assert taken and all(t[0] for t in taken)
    for n in LORA_GRADS:
        assert rel(g[n], g_ref[n]) < 1e-4, n


@pytest.mark.parametrize("light", MODES)
def test_light_tail_int64_variant_is_bitwise_identical(monkeypatch, light):
    """The 64-bit index specialisation of every launch gives the int32 launches' numbers."""
    p = problem(11, 7, 40, 27, 2, 8, torch.float32, seed=6)
    out32, g32 = run(p, LORA_GRADS, light)
    monkeypatch.setattr(K, "needs_int64", lambda *t: True)
    out64, g64 = run(p, LORA_GRADS, light)
    assert torch.equal(out32, out64)
    for n in LORA_GRADS:
        assert torch.equal(g32[n], g64[n]), n


@pytest.mark.parametrize("light", MODES)
@pytest.mark.parametrize(
    "grads,H,I,r,applies,act_kept",
    [
        (LORA_GRADS, 40, 27, 8, {"glu", "gemm"}, {"glu", "gemm"}),
        (("x", "W2", "gates"), 40, 27, 0, set(), {"glu", "gemm"}),  # a trainable down weight: dW2 wants g·dout rows
        (("A2", "B2", "gates"), 40, 27, 8, set(), {"glu", "gemm"}),  # nothing flows into h: dgates alone would need dX
        (("x", "gates"), 24, 40, 0, {"glu"}, set()),  # "gemm" would keep act (I = 40) for dgates, wider than y (H = 24)
        (("x", "A2", "gates"), 24, 40, 8, {"glu", "gemm"}, {"glu", "gemm"}),  # ... unless dA2 keeps it anyway
        (("x", "gates"), 40, 27, 0, {"glu", "gemm"}, {"gemm"}),  # "glu" recomputes act from h for dgates
        (("x",), 24, 40, 0, {"glu", "gemm"}, set()),  # no dgates: act is not kept at all
    ],
    ids=["lora", "dW2", "no-up", "act-wider-than-y", "act-kept-for-dA2", "act-for-dgates", "no-dgates"],
)
def test_where_the_light_tail_applies_and_what_it_keeps(grads, H, I, r, applies, act_kept, light):
    """The light tail runs where it keeps less and launches less; there the expert outputs y are freed with the
    forward (weakref dead before the backward), elsewhere the old backward keeps them and is bitwise the separate
    nodes' (test_scattermoe_merged). The activation act is kept only where a gradient needs it. Gradients match the
    reference either way."""
    p = problem(10, 5, H, I, 2, r, torch.float32, seed=8)
    seen = {}
    real = K.combine, K.silu_glu_fwd, ops.lora_linear_fwd
    K.combine = lambda y, g, *a: seen.setdefault("y", weakref.ref(y)) and real[0](y, g, *a)

    def silu_fwd(h):
        act = real[1](h)
        seen["act"] = weakref.ref(act)
        return act

    def up(*a, act_out=None, **kw):  # the up projection with the GLU in its epilogue (ops.SETTINGS["glu_epilogue"])
        if act_out is not None:
            seen["act"] = weakref.ref(act_out)
        return real[2](*a, act_out=act_out, **kw)

    K.silu_glu_fwd, ops.lora_linear_fwd = silu_fwd, up
    try:
        leaves = {n: (p[n].detach().clone().requires_grad_(n in grads) if p[n] is not None else None) for n in NAMES}
        sei, ssi, offs = p["routing"]
        l1 = (leaves["A1"], leaves["B1"], 0.7) if r else None
        l2 = (leaves["A2"], leaves["B2"], 1.3) if r else None
        old = dict(ops.SETTINGS)
        ops.SETTINGS.update(light_tail=light, backend="triton")
        try:
            out = ops.glu_experts(leaves["x"], leaves["W1"], leaves["W2"], 2, sei, ssi, offs, l1, l2, leaves["gates"])
            assert (seen["y"]() is None) == (light in applies), "y kept only by the old backward"
            assert (seen["act"]() is not None) == (light in act_kept), "act kept only where a gradient needs it"
            out.backward(p["dout"])
        finally:
            ops.SETTINGS.clear()
            ops.SETTINGS.update(old)
    finally:
        K.combine, K.silu_glu_fwd, ops.lora_linear_fwd = real
    _, g_ref = run_reference(p, grads)
    for n in grads:
        assert rel(leaves[n].grad, g_ref[n]) < 1e-4, n


def test_light_tail_setting_is_checked():
    """An unknown light_tail value is an error naming the accepted ones."""
    old = dict(ops.SETTINGS)
    ops.SETTINGS["light_tail"] = "fast"
    try:
        with pytest.raises(ValueError, match="SCATTERMOE_LIGHT_TAIL"):
            ops._light_mode()
    finally:
        ops.SETTINGS.clear()
        ops.SETTINGS.update(old)
    for v, want in [("0", None), (False, None), ("1", "glu"), ("glu", "glu"), ("gemm", "gemm")]:
        ops.SETTINGS["light_tail"] = v
        try:
            assert ops._light_mode() == want, v
        finally:
            ops.SETTINGS.clear()
            ops.SETTINGS.update(old)


def test_silu_glu_gate_bwd_matches_reference():
    """The GLU-backward kernel with the routing weight: dh of ``g·dacc`` and dgates ``Σ act·dacc`` per flat row,
    several column blocks, against float64 autograd."""
    g = torch.Generator().manual_seed(2)
    T, k, I = 7, 3, 37
    L = T * k
    ssi = torch.randperm(L, generator=g).to(DEV)
    h = torch.randn(L, 2 * I, generator=g).to(DEV)
    dacc = torch.randn(L, I, generator=g).to(DEV)
    gates = torch.rand(T, k, generator=g).to(DEV)
    real = K._glu_block
    K._glu_block = lambda n: 16
    try:
        dh, dg = K.silu_glu_gate_bwd(h, dacc, gates, ssi)
        dh2, none = K.silu_glu_gate_bwd(h, dacc, gates, ssi, need_dg=False)
    finally:
        K._glu_block = real
    hr = h.double().requires_grad_(True)
    gw = gates.double().reshape(-1)[ssi][:, None]
    act = reference.glu(hr)
    (act * gw * dacc.double()).sum().backward()
    want_dg = torch.zeros(L, dtype=torch.float64, device=DEV)
    want_dg[ssi] = (reference.glu(h.double()) * dacc.double()).sum(1)
    assert rel(dh, hr.grad) < 1e-5 and torch.equal(dh, dh2) and none is None
    assert rel(dg, want_dg.view(T, k)) < 1e-5 and dg.dtype == torch.float32
    with pytest.raises(ValueError, match="dacc"):
        K.silu_glu_gate_bwd(h, dacc[:, :5], gates, ssi)
    with pytest.raises(ValueError, match="routing weights"):
        K.silu_glu_gate_bwd(h, dacc, gates[:, :1], ssi)


def test_glu_down_dx_checks_its_operands():
    """Clear errors for a wrong activation shape, missing act with dgates, and write_xa on the split path."""
    p = problem(6, 3, 16, 8, 2, 4, torch.float32, seed=1)
    sei, ssi, offs = p["routing"]
    Wt = p["W2"].transpose(1, 2)
    L = ssi.numel()
    act = torch.zeros(L, 8, device=DEV)
    with pytest.raises(ValueError, match="act"):
        K.glu_down_dx(p["dout"], Wt, ssi, offs, 2, act[:, :4], p["gates"], glu=False)
    with pytest.raises(ValueError, match="act"):
        K.glu_down_dx(p["dout"], Wt, ssi, offs, 2, None, p["gates"], glu=False)
    with pytest.raises(ValueError, match="write_xa"):
        K.glu_down_dx(p["dout"], Wt, ssi, offs, 2, act, p["gates"], B=torch.zeros(3, 4, 8, device=DEV),
                      xa_in=torch.zeros(L, 4, device=DEV), write_xa=True, glu=False)
    with pytest.raises(ValueError, match="routing weights"):
        K.glu_down_dx(p["dout"], Wt, ssi, offs, 2, act, p["gates"][:, :1], glu=False)
    dact, xa, dg = K.glu_down_dx(p["dout"], Wt, ssi, offs, 2, None, p["gates"], glu=False, need_dg=False)
    assert dact.shape == (L, 8) and xa is None and dg is None
