"""gpt-oss's experts through the merged node (``ops.glu_experts`` with ``b1``/``b2`` and ``clamp``) and its light tail:
the interleaved clamped sigmoid-GLU, the projections' biases, the down bias's share of the routing weights' gradient
(``kernels.bias_dg``) and the gated clamped-GLU backward (``kernels.clamped_glu_gate_bwd``).

Against the separate nodes (``scattered_experts`` with biases, ``clamped_glu``, ``scattered_experts``, ``combine``;
``SETTINGS["merged"] = False`` at model level): the forward output bitwise, the old backward (light tail off) bitwise,
the light tail within rounding; against float64 torch (the reference's ops, autograd) in fp32. Values cross the clamp
(checked). A tiny real ``GptOssForCausalLM`` with peft LoRA on ``target_parameters`` takes the merged node (its grad_fn)
and matches the separate nodes: loss, hidden-state, router, LoRA and (when trainable) bias gradients. CPU:
``TRITON_INTERPRET=1``, fp32 and fp16; CUDA: native."""

import pytest
import torch

from host_plugin_scattermoe import kernels as K
from host_plugin_scattermoe import ops, reference
from host_plugin_scattermoe.routing import sort_tokens
from host_plugin_scattermoe.testing import DEV, TRITON_RUNS, float64_experts_reference, rel

pytestmark = pytest.mark.skipif(not TRITON_RUNS, reason="Triton needs CUDA or TRITON_INTERPRET=1")
ALPHA, LIMIT = 1.702, 7.0
NAMES = ("x", "W1", "W2", "A1", "B1", "A2", "B2", "gates", "b1", "b2")


def problem(T, E, H, I, k, r, dtype, seed=0, h_scale=6.0):
    """Kernel-layout weights as gpt-oss stores them (``W1 [E, H, 2I]`` interleaved gate/up columns, ``W2 [E, I, H]``,
    both contiguous: gpt-oss's parameters are transposed already), biases, fp32 LoRA factors, fp32 routing weights;
    ``h`` has a standard deviation of about ``h_scale`` so that it crosses ``±LIMIT``. Expert 1 idle."""
    g = torch.Generator().manual_seed(seed)

    def rn(*s, scale=1.0, dt=dtype):
        return (torch.randn(*s, generator=g) * scale).to(DEV, dt)

    allowed = torch.tensor([e for e in range(E) if e != 1])
    idx = allowed[torch.rand(T, allowed.numel(), generator=g).topk(k, dim=1).indices].to(DEV)
    p = dict(
        x=rn(T, H),
        W1=rn(E, H, 2 * I, scale=h_scale * H**-0.5),
        W2=rn(E, I, H, scale=I**-0.5),
        A1=rn(E, r, H, scale=H**-0.5, dt=torch.float32) if r else None,
        B1=rn(E, 2 * I, r, scale=0.5, dt=torch.float32) if r else None,
        A2=rn(E, r, I, scale=I**-0.5, dt=torch.float32) if r else None,
        B2=rn(E, H, r, scale=0.5, dt=torch.float32) if r else None,
        gates=torch.rand(T, k, generator=g).to(DEV),
        b1=rn(E, 2 * I, scale=2.0),
        b2=rn(E, H, scale=1.0),
    )
    p["dout"] = rn(T, H)
    p["idx"], p["routing"] = idx, sort_tokens(idx, E)
    p["k"] = k
    return p


def leaves_of(p, grads, dtype=None):
    return {n: (p[n].detach().to(dtype or p[n].dtype).clone().requires_grad_(n in grads) if p[n] is not None else None)
            for n in NAMES}


def run(p, grads, light, merged=True, s1=0.7, s2=1.3, fused_lora=True, spy=None, seen_h=None):
    """Forward + backward; ``merged``: ``ops.glu_experts``, else the separate nodes. ``spy`` records the tail kernels
    (``"clamped"``: clamped_glu_gate_bwd, ``"gemm"``: glu_down_dx(glu=False), ``"old"``: combine_bwd, ``"bias"``:
    bias_dg); ``seen_h`` collects the up projection's output."""
    lv = leaves_of(p, grads)
    sei, ssi, offs = p["routing"]
    l1 = (lv["A1"], lv["B1"], s1) if lv["A1"] is not None else None
    l2 = (lv["A2"], lv["B2"], s2) if lv["A2"] is not None else None
    old = dict(ops.SETTINGS)
    # the gate's own kernel (spied on below; the up projection's GLU epilogue has its own tests)
    ops.SETTINGS.update(light_tail=light, backend="triton", fused_lora=fused_lora, glu_epilogue=False)
    names = ("glu_down_dx", "clamped_glu_gate_bwd", "combine_bwd", "bias_dg", "clamped_glu_fwd", "silu_glu_gate_bwd")
    real = {n: getattr(K, n) for n in names}
    real_up = ops.lora_linear_fwd

    def up(*a, act_out=None, **kw):  # with SCATTERMOE_GLU_EPILOGUE=1 the up projection's epilogue writes act (no gate call)
        h, xa = real_up(*a, act_out=act_out, **kw)
        if act_out is not None:
            seen_h.append(h.detach().clone())
        return h, xa

    try:
        if spy is not None:
            K.glu_down_dx = lambda *a, **kw: spy.append("gemm" if not kw.get("glu", True) else "?") or real["glu_down_dx"](*a, **kw)
            K.clamped_glu_gate_bwd = lambda *a, **kw: spy.append("clamped") or real["clamped_glu_gate_bwd"](*a, **kw)
            K.silu_glu_gate_bwd = lambda *a, **kw: spy.append("silu") or real["silu_glu_gate_bwd"](*a, **kw)
            K.combine_bwd = lambda *a, **kw: spy.append("old") or real["combine_bwd"](*a, **kw)
            K.bias_dg = lambda *a, **kw: spy.append("bias") or real["bias_dg"](*a, **kw)
        if seen_h is not None:
            K.clamped_glu_fwd = lambda h, *a: seen_h.append(h.detach().clone()) or real["clamped_glu_fwd"](h, *a)
            ops.lora_linear_fwd = up
        if merged:
            out = ops.glu_experts(lv["x"], lv["W1"], lv["W2"], p["k"], sei, ssi, offs, l1, l2, lv["gates"],
                                  b1=lv["b1"], b2=lv["b2"], clamp=(ALPHA, LIMIT))
        else:
            A1, B1, s1_ = l1 if l1 else (None, None, 0.0)
            A2, B2, s2_ = l2 if l2 else (None, None, 0.0)
            h = ops.scattered_experts(lv["x"], lv["W1"], p["k"], sei, ssi, offs, A1, B1, s1_, lv["b1"], False, True)
            a = ops.clamped_glu(h, ALPHA, LIMIT)
            y = ops.scattered_experts(a, lv["W2"], 1, sei, ssi, offs, A2, B2, s2_, lv["b2"], True, False)
            out = ops.combine(y, lv["gates"])
        out.backward(p["dout"])
    finally:
        for n, f in real.items():
            setattr(K, n, f)
        ops.lora_linear_fwd = real_up
        ops.SETTINGS.clear()
        ops.SETTINGS.update(old)
    return out.detach(), {n: lv[n].grad for n in grads}


def run_reference(p, grads):
    """float64 through the reference's ops (separate, autograd), gpt-oss's clamped gate."""
    return float64_experts_reference(p, NAMES, grads, apply_gate=lambda h: reference.gpt_oss_glu(h, ALPHA, LIMIT))


LORA_GRADS = ("x", "A1", "B1", "A2", "B2", "gates")
# (T, E, H, I, top_k, rank, LoRA path): E not a power of two, odd H/I, expert 1 idle
CASES = [
    (9, 5, 33, 19, 1, 4, "fused"),
    (11, 7, 40, 27, 4, 8, "fused"),
    (13, 6, 35, 24, 2, 4, "split"),
    (13, 6, 35, 24, 2, 0, "none"),
]


def _crosses_clamp(hs):
    h = torch.cat([t.float() for t in hs])
    gate, up = h[:, ::2], h[:, 1::2]
    return bool((gate > LIMIT).any() and (gate < LIMIT).any() and (up > LIMIT).any() and (up < -LIMIT).any())


@pytest.mark.parametrize("light", ["glu", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T%d-E%d-H%d-I%d-k%d-r%d-%s" % c)
def test_light_tail_matches_separate_nodes_and_reference(case, dtype, light):
    """Frozen biases (as under LoRA): the light tail runs (the gated clamped-GLU backward or the dX epilogue, plus the
    down bias's dg launch; no combine backward); output bitwise the separate nodes', gradients within rounding of
    theirs and (fp32) of float64 torch; the idle expert's factors get exact zeros."""
    T, E, H, I, k, r, mode = case
    p = problem(T, E, H, I, k, r, dtype, seed=T + k)
    grads = LORA_GRADS if r else ("x", "gates")
    spy, hs = [], []
    out, g = run(p, grads, light, fused_lora=mode != "split", spy=spy)
    assert sorted(spy) == sorted(["bias", "clamped" if light == "glu" else "gemm"]), spy
    # h seen in the separate nodes' gate (the merged node's may come from the up projection's epilogue)
    out_s, g_s = run(p, grads, light, merged=False, fused_lora=mode != "split", seen_h=hs)
    assert _crosses_clamp(hs), "the test's values should cross the clamp on both sides"
    assert torch.equal(out, out_s)  # same forward kernels, same order
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    for n in grads:
        assert g[n] is not None and g[n].dtype == p[n].dtype, n
        assert rel(g[n], g_s[n]) < tol, (n, rel(g[n], g_s[n]))
    assert g["gates"].dtype == torch.float32
    if dtype == torch.float32:
        want, g_ref = run_reference(p, grads)
        assert rel(out, want) < 1e-5
        for n in grads:
            assert rel(g[n], g_ref[n]) < 1e-4, (n, rel(g[n], g_ref[n]))
    if r:
        for n in ("A1", "B1", "A2", "B2"):
            assert g[n][1].abs().max() == 0, n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "grads,path",
    [
        (LORA_GRADS + ("b1",), "clamped"),  # a trainable up bias: db1 from dh's rows (g applied already)
        (LORA_GRADS + ("b1", "b2"), "old"),  # a trainable down bias wants g·dout rows: the old backward
        (("x", "b2", "gates"), "old"),
        (("b1", "gates"), "clamped"),  # only the up bias trains: the gradient still flows into h
    ],
    ids=["db1", "db1-db2", "x-db2", "db1-only"],
)
def test_bias_gradients(grads, path, dtype):
    """Trainable biases (unusual under LoRA, but right): the light tail where it applies, else the old backward,
    bitwise the separate nodes'; every gradient against the separate nodes and (fp32) float64 torch."""
    p = problem(11, 7, 40, 27, 2, 8, dtype, seed=3)
    spy = []
    out, g = run(p, grads, "glu", spy=spy)
    assert path in spy and (path == "old") == ("clamped" not in spy), spy
    out_s, g_s = run(p, grads, "glu", merged=False)
    assert torch.equal(out, out_s)
    for n in grads:
        assert g[n] is not None and g[n].dtype == p[n].dtype, n
        if path == "old":
            _bitwise(n, g[n], g_s[n])
        else:
            assert rel(g[n], g_s[n]) < (1e-5 if dtype == torch.float32 else 5e-3), (n, rel(g[n], g_s[n]))
    if dtype == torch.float32:
        _, g_ref = run_reference(p, grads)
        for n in grads:
            assert rel(g[n], g_ref[n]) < 1e-4, (n, rel(g[n], g_ref[n]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_old_backward_is_bitwise_the_separate_nodes(dtype):
    """Light tail off: the merged node launches the separate nodes' kernels, biases included: bitwise equal."""
    p = problem(13, 6, 35, 24, 2, 4, dtype, seed=9)
    grads = LORA_GRADS + ("b1", "b2")
    out, g = run(p, grads, "0")
    out_s, g_s = run(p, grads, "0", merged=False)
    assert torch.equal(out, out_s)
    for n in grads:
        _bitwise(n, g[n], g_s[n])


def _bitwise(name, got, want):
    """Bitwise (the bias gradients too: ``proj_backward`` sums each expert's rows in a fixed order, see
    ``test_bias_gradient_is_deterministic``)."""
    assert torch.equal(got, want), (name, (got - want).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("gout", [True, False], ids=["grouped", "flat"])
def test_bias_gradient_is_deterministic(gout, dtype):
    """``proj_backward``'s bias gradient (each expert's rows of ``dy`` summed, fp32): equal to float64 torch, zero for
    an idle expert, and bitwise the same on a second run (it replaced ``index_add_``, which sums with atomics on CUDA);
    many rows per expert, ``dy`` grouped (up projection) or flat (down projection)."""
    g = torch.Generator().manual_seed(4)
    T, E, k, N = 300, 5, 2, 70
    allowed = torch.tensor([0, 2, 3, 4])
    idx = allowed[torch.rand(T, 4, generator=g).topk(k, dim=1).indices].to(DEV)
    sei, ssi, offs = sort_tokens(idx, E)
    dy = torch.randn(T * k, N, generator=g).to(DEV, dtype)
    W = torch.zeros(E, 8, N, device=DEV, dtype=dtype)
    args = (dy, None, W, None, None, None, sei, ssi, offs, k, 1.0, True, gout, False, False, False, True, False, False)
    db = ops.proj_backward(*args)[2]
    db2 = ops.proj_backward(*args)[2]
    rows = dy.double() if gout else dy.double()[ssi]
    want = torch.zeros(E, N, dtype=torch.float64, device=DEV).index_add_(0, sei, rows)
    assert db.dtype == torch.float32 and db.shape == (E, N)
    assert rel(db, want) < 1e-6 and db[1].abs().max() == 0
    assert torch.equal(db, db2)


def test_light_tail_several_row_and_column_blocks(monkeypatch):
    """Small tiles: several column blocks in the gate's backward (dgates from per-block partials), several row
    blocks per expert, several token and H blocks in bias_dg; fused and split LoRA."""
    monkeypatch.setattr(K, "_glu_block", lambda I: 16)
    if K.INTERPRET:
        monkeypatch.setattr(K, "INTERP_S2S", {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 3})
        monkeypatch.setattr(K, "INTERP_OUTER", {"BLOCK_M": 16, "BLOCK_P": 16, "BLOCK_Q": 16})
    else:
        monkeypatch.setattr(K, "FORCE", {"s2s": K._cfg(16, 16, 16, 3, 4, 2)})
    p = problem(40, 3, 70, 45, 2, 8, torch.float32, seed=5)
    for split in (False, True):
        _, g = run(p, LORA_GRADS, "glu", fused_lora=not split)
        _, g_ref = run_reference(p, LORA_GRADS)
        for n in LORA_GRADS:
            assert rel(g[n], g_ref[n]) < 1e-4, (n, split)


def test_clamped_glu_gate_bwd_matches_float64():
    """The gated clamped-GLU backward kernel against float64 autograd: dh of ``g·dacc`` (zero where a clamp cuts the
    gradient) and dgates ``Σ act·dacc`` per flat row plus ``dg_add``, several column blocks, values across ±limit;
    without dgates the same dh; clear errors for wrong shapes."""
    g = torch.Generator().manual_seed(2)
    T, k, I = 7, 3, 37
    L = T * k
    ssi = torch.randperm(L, generator=g).to(DEV)
    h = (torch.randn(L, 2 * I, generator=g) * 8).to(DEV)
    h[0, :4] = torch.tensor([LIMIT, LIMIT, -LIMIT, 3.0])  # on the clamp's edges: torch passes the gradient there
    dacc = torch.randn(L, I, generator=g).to(DEV)
    gates = torch.rand(T, k, generator=g).to(DEV)
    extra = torch.randn(L, generator=g).to(DEV)
    real = K._glu_block
    K._glu_block = lambda n: 16
    try:
        dh, dg = K.clamped_glu_gate_bwd(h, dacc, gates, ssi, ALPHA, LIMIT)
        dh2, none = K.clamped_glu_gate_bwd(h, dacc, gates, ssi, ALPHA, LIMIT, need_dg=False)
        _, dg3 = K.clamped_glu_gate_bwd(h, dacc, gates, ssi, ALPHA, LIMIT, dg_add=extra)
        dh_plain = K.clamped_glu_bwd(h, dacc * gates.reshape(-1)[ssi][:, None], ALPHA, LIMIT)
    finally:
        K._glu_block = real
    hr = h.double().requires_grad_(True)
    gw = gates.double().reshape(-1)[ssi][:, None]
    (reference.gpt_oss_glu(hr, ALPHA, LIMIT) * gw * dacc.double()).sum().backward()
    want_dg = torch.zeros(L, dtype=torch.float64, device=DEV)
    want_dg[ssi] = (reference.gpt_oss_glu(h.double(), ALPHA, LIMIT) * dacc.double()).sum(1)
    assert (hr.grad == 0).any(), "some values should be clamped"
    assert rel(dh, hr.grad) < 1e-6 and torch.equal(dh, dh2) and none is None
    assert rel(dh, dh_plain) < 1e-6  # the ungated kernel on g·dacc
    assert rel(dg, want_dg.view(T, k)) < 1e-6 and dg.dtype == torch.float32
    assert rel(dg3, (want_dg + extra.double()).view(T, k)) < 1e-6
    with pytest.raises(ValueError, match="dacc"):
        K.clamped_glu_gate_bwd(h, dacc[:, :5], gates, ssi, ALPHA, LIMIT)
    with pytest.raises(ValueError, match="routing weights"):
        K.clamped_glu_gate_bwd(h, dacc, gates[:, :1], ssi, ALPHA, LIMIT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("T,H,E,k", [(5, 20, 3, 2), (37, 130, 17, 4), (16, 64, 32, 1)])
def test_bias_dg_matches_float64(T, H, E, k, dtype):
    """``bias_dg``: ``<dout[t], b[e_f]>`` per flat row in fp32 (partial token and H blocks, E not a power of two)."""
    g = torch.Generator().manual_seed(T)
    dout = torch.randn(T, H, generator=g).to(DEV, dtype)
    b = torch.randn(E, H, generator=g).to(DEV, dtype)
    idx = torch.rand(T, E, generator=g).topk(k, dim=1).indices.to(DEV)
    sei, ssi, _ = sort_tokens(idx, E)
    ef = K.flat_experts(sei, ssi)
    assert torch.equal(ef, idx.reshape(-1).to(ef.dtype))
    got = K.bias_dg(dout, b, ef, k)
    want = (dout.double()[:, None, :] * b.double()[idx]).sum(-1).reshape(-1)
    assert got.dtype == torch.float32 and got.shape == (T * k,)
    assert rel(got, want) < 1e-6
    with pytest.raises(ValueError, match="contiguous"):
        K.bias_dg(dout.t().contiguous().t(), b, ef, k)


# ---------------------------------------------------------------------------------------------------------------
# model level: a tiny GptOssForCausalLM, peft LoRA on target_parameters
# ---------------------------------------------------------------------------------------------------------------


def _gpt_oss(dtype, seed=0):
    from host.testing import tiny_config
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from host_plugin_scattermoe import experts, lora

    experts.register()
    cfg = tiny_config("gpt_oss", 96, num_local_experts=5, intermediate_size=24,
                      layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(DEV, dtype)
    H = cfg.hidden_size
    with torch.no_grad():  # values across the clamp (h std ~6), biases that matter
        for name, prm in model.named_parameters():
            if name.endswith("experts.gate_up_proj"):
                prm.normal_(0, 6 * H**-0.5)
            elif name.endswith("_bias") and "experts" in name:
                prm.normal_(0, 0.5)
    lcfg = LoraConfig(r=4, lora_alpha=8, target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                      target_modules=["q_proj"], init_lora_weights=False)
    pm = get_peft_model(model, lcfg)
    lora.attach(pm)
    pm.base_model.model.set_experts_implementation("scattermoe")
    for name, prm in pm.named_parameters():
        if ".router." in name:  # the router's gradient (through the routing weights) is checked too
            prm.requires_grad_(True)
    return pm


def _experts_modules(pm):
    return [m for m in pm.modules() if hasattr(m, "num_experts") and hasattr(m, "down_proj")]


def _model_step(pm, ids, merged, monkeypatch):
    monkeypatch.setitem(ops.SETTINGS, "merged", merged)
    nodes, hs = [], []
    hooks = [m.register_forward_hook(lambda mod, a, out: nodes.append(type(out.grad_fn).__name__))
             for m in _experts_modules(pm)]
    real, real_up = K.clamped_glu_fwd, ops.lora_linear_fwd
    monkeypatch.setattr(K, "clamped_glu_fwd", lambda h, *a: hs.append(h.detach().clone()) or real(h, *a))

    def up(*a, act_out=None, **kw):  # SCATTERMOE_GLU_EPILOGUE=1: the up projection's epilogue writes act
        h, xa = real_up(*a, act_out=act_out, **kw)
        if act_out is not None:
            hs.append(h.detach().clone())
        return h, xa

    monkeypatch.setattr(ops, "lora_linear_fwd", up)
    try:
        pm.zero_grad(set_to_none=True)
        loss = pm(input_ids=ids, labels=ids).loss
        # fp16: a loss scale (as AMP's), else the earliest layers' gradients are fp16 subnormals (~1e-5)
        (loss * (256.0 if loss.dtype == torch.float16 else 1.0)).backward()
    finally:
        for hk in hooks:
            hk.remove()
        monkeypatch.setattr(K, "clamped_glu_fwd", real)
    grads = {n: prm.grad.detach().clone() for n, prm in pm.named_parameters() if prm.requires_grad}
    return loss.detach(), grads, nodes, hs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("train_bias", [False, True], ids=["frozen-bias", "trainable-bias"])
def test_gpt_oss_model_takes_the_merged_node(train_bias, dtype, monkeypatch):
    """A real gpt-oss model: the experts' output comes from the merged node (``_GluExpertsFunctionBackward``; the
    separate nodes end in the combine's), values cross the clamp, the loss is bitwise the separate nodes' and every
    gradient (LoRA A/B of both projections, q_proj LoRA, router weight and bias, biases when trainable) within
    rounding of theirs."""
    monkeypatch.setitem(ops.SETTINGS, "backend", "triton")
    monkeypatch.setitem(ops.SETTINGS, "glu_epilogue", False)  # the gate's own kernel is spied on
    pm = _gpt_oss(dtype)
    if train_bias:
        for name, prm in pm.named_parameters():
            if name.endswith("_bias") and "experts" in name:
                prm.requires_grad_(True)
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1)).to(DEV)
    l_m, g_m, nodes_m, _ = _model_step(pm, ids, True, monkeypatch)
    l_s, g_s, nodes_s, hs = _model_step(pm, ids, False, monkeypatch)  # h from the separate nodes' gate kernel
    assert nodes_m == ["_GluExpertsFunctionBackward"] * 2, nodes_m
    assert nodes_s == ["_CombineFunctionBackward"] * 2, nodes_s
    assert _crosses_clamp(hs)
    assert torch.equal(l_m, l_s)
    names = set(g_s)
    assert any("router.weight" in n for n in names) and any("router.bias" in n for n in names)
    assert sum("experts" in n and "lora_" in n for n in names) == 8  # A and B of both projections, 2 layers
    assert sum(n.endswith("_bias") and "experts" in n for n in names) == (4 if train_bias else 0)
    for n in names:
        # fp16: the experts' and router's gradients within 5e-3; the attention LoRA's (behind layer 1's experts: its
        # dx, rounded differently by the light tail, goes through an fp16 attention backward into a gradient ~200x
        # smaller than layer 0's) within 2e-2
        tol = 1e-5 if dtype == torch.float32 else (5e-3 if ".mlp." in n else 2e-2)
        assert g_m[n].norm() > 0 or "lora_B" in n, n
        assert rel(g_m[n], g_s[n]) < tol, (n, rel(g_m[n], g_s[n]))


def test_merged_kwargs_is_the_one_dispatch(monkeypatch):
    """``experts.merged_kwargs`` (what mxfp4 calls): gpt-oss gets its clamp and biases, the SiLU-gated families
    ``clamp=None``; None where the separate nodes run (merged off, the torch backend, the fused tail, fused gates off)."""
    from host.testing import tiny_config
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    from host_plugin_scattermoe import experts

    monkeypatch.setitem(ops.SETTINGS, "backend", "triton")
    gpt = GptOssExperts(tiny_config("gpt_oss", 96, num_local_experts=4, intermediate_size=16,
                                    layer_types=["sliding_attention", "full_attention"]))
    qwen = Qwen3MoeExperts(tiny_config("qwen3_moe", 96))
    x = torch.zeros(2, gpt.gate_up_proj.shape[1], device=DEV)
    got = experts.merged_kwargs(gpt, x, gpt.gate_up_proj_bias, gpt.down_proj_bias)
    assert got["clamp"] == (float(gpt.alpha), float(gpt.limit)) == (ALPHA, LIMIT)
    assert got["b1"] is gpt.gate_up_proj_bias and got["b2"] is gpt.down_proj_bias
    assert experts.merged_kwargs(qwen, x) == {"b1": None, "b2": None, "clamp": None}
    for key, off in [("merged", False), ("backend", "torch"), ("fused_tail", True), ("fused_gates", False)]:
        monkeypatch.setitem(ops.SETTINGS, key, off)
        assert experts.merged_kwargs(gpt, x) is None and experts.merged_kwargs(qwen, x) is None, key
        monkeypatch.undo()
        monkeypatch.setitem(ops.SETTINGS, "backend", "triton")
