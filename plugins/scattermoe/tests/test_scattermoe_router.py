"""The fused router (router.py, router_kernels.py) against each family's own router forward and autograd: the same
logits, experts and weights, and the same gradients for the input, the router's weight and bias, through the scores
and through the logits (an auxiliary loss). On the CPU the kernels run under the Triton interpreter (fp32, fp16); on a
GPU compiled, in bf16 too."""

from __future__ import annotations

import importlib
import types
import warnings

import pytest
import torch

from host_plugin_scattermoe import ops, router
from host_plugin_scattermoe.testing import DEV, TRITON_RUNS

pytestmark = pytest.mark.skipif(not TRITON_RUNS, reason="needs CUDA or TRITON_INTERPRET=1")

# (module, config class, router class, config kwargs)
FAMILIES = {
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeTopKRouter", dict(num_experts=12, norm_topk_prob=True)),
    "qwen3_moe_nonorm": ("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeTopKRouter", dict(num_experts=12, norm_topk_prob=False)),
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeTopKRouter", dict(num_experts=12, norm_topk_prob=True)),
    "qwen3_next": ("qwen3_next", "Qwen3NextConfig", "Qwen3NextTopKRouter", dict(num_experts=12, norm_topk_prob=True)),
    "qwen3_5_moe": ("qwen3_5_moe", "Qwen3_5MoeTextConfig", "Qwen3_5MoeTopKRouter", dict(num_experts=12)),
    "olmoe": ("olmoe", "OlmoeConfig", "OlmoeTopKRouter", dict(num_experts=12, norm_topk_prob=False)),
    "mixtral": ("mixtral", "MixtralConfig", "MixtralTopKRouter", dict(num_local_experts=12)),
    "gpt_oss": ("gpt_oss", "GptOssConfig", "GptOssTopKRouter", dict(num_local_experts=12)),
}


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    """The experts' ``auto`` backend keeps the CPU on torch; ``triton`` runs the kernels under the interpreter."""
    monkeypatch.setitem(ops.SETTINGS, "backend", "triton")
    monkeypatch.setitem(ops.SETTINGS, "fused_router", True)
    monkeypatch.setattr(router, "CHECKED", {})


def make_router(family: str, hidden=40, top_k=3, dtype=torch.float32, seed=0, experts=None):
    mod, cfg_name, cls_name, kw = FAMILIES[family]
    if experts:
        kw = {n: (experts if n in ("num_experts", "num_local_experts") else v) for n, v in kw.items()}
    m = importlib.import_module(f"transformers.models.{mod}.modeling_{mod}")
    cfg = getattr(importlib.import_module("transformers"), cfg_name)(hidden_size=hidden, num_experts_per_tok=top_k, **kw)
    r = getattr(m, cls_name)(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in r.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return r.to(DEV, dtype)


def run(r, x, gs, gl, fused: bool):
    """Forward and backward of ``r`` on ``x``: ``(logits, scores, ids, x.grad, {param: grad})``. ``gs [T, E]``: each
    expert's weight gradient (gathered by the chosen ids: equal values may come in another slot order)."""
    x = x.detach().clone().requires_grad_(True)
    for p in r.parameters():
        p.grad = None
    fwd = types.MethodType(router.fused_forward, r) if fused else type(r).forward.__get__(r)
    if fused:
        r.__dict__[router._ORIGINAL] = type(r).forward.__get__(r)
    logits, scores, ids = fwd(x)
    loss = (scores.float() * gs.gather(1, ids)).sum() + ((logits.float() * gl).sum() if gl is not None else 0)
    loss.backward()
    return logits.detach(), scores.detach(), ids, x.grad, {n: p.grad for n, p in r.named_parameters()}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("aux", [False, True], ids=["scores", "scores+logits"])
def test_fused_router_matches_the_model(family, aux):
    torch.manual_seed(0)
    r = make_router(family)
    r.weight.requires_grad_(True)
    T = 37  # not a multiple of the token block
    x = torch.randn(T, 40, device=DEV)
    gs = torch.randn(T, 12, device=DEV)
    gl = torch.randn(T, 12, device=DEV) if aux else None
    ref = run(r, x, gs, gl, fused=False)
    got = run(r, x, gs, gl, fused=True)
    assert router.CHECKED == {router.class_path(r): True}
    assert rel(got[0], ref[0]) < 1e-6  # logits: the same GEMM, another summation order
    assert torch.equal(got[2], ref[2])  # experts, in the same (descending) order
    assert got[1].dtype == ref[1].dtype
    assert rel(got[1], ref[1]) < 1e-6
    assert rel(got[3], ref[3]) < 1e-5  # input gradient
    for n in ref[4]:
        assert rel(got[4][n], ref[4][n]) < 1e-5, n  # weight (and gpt-oss's bias)


def test_fused_router_fp16():
    r = make_router("qwen3_moe", hidden=64, dtype=torch.float16)
    x = torch.randn(50, 64, device=DEV, dtype=torch.float16)
    gs = torch.randn(50, 12, device=DEV)
    ref = run(r, x, gs, None, fused=False)
    got = run(r, x, gs, None, fused=True)
    assert torch.allclose(got[0], ref[0], rtol=2.0**-10, atol=1e-4)
    assert torch.equal(got[2].sort(1).values, ref[2].sort(1).values)
    assert rel(got[1], ref[1]) < 2e-3
    assert rel(got[3], ref[3]) < 5e-3


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_ties_choose_the_lowest_ids(family):
    """Tokens whose logits tie (here: all equal, a zero input) route to the lowest expert ids, weights equal (torch.topk
    leaves the order open: the CPU picks others)."""
    r = make_router(family)
    with torch.no_grad():
        if getattr(r, "bias", None) is not None:
            r.bias.zero_()
    x = torch.zeros(5, 40, device=DEV)
    x[1] = 1.0
    got = run(r, x, torch.ones(5, 12, device=DEV), None, fused=True)
    ref = run(r, x, torch.ones(5, 12, device=DEV), None, fused=False)
    assert got[2][0].tolist() == [0, 1, 2]
    assert torch.allclose(got[1][0], torch.full((3,), 1 / 3, device=DEV))
    assert torch.equal(got[2][1], ref[2][1])


def test_large_expert_count_and_k():
    """256 experts, top-8 (Qwen3.5-35B-A3B's router) and many token blocks."""
    r = make_router("qwen3_5_moe", hidden=48, top_k=8, experts=256)
    x = torch.randn(70, 48, device=DEV)
    gs = torch.randn(70, 256, device=DEV)
    ref = run(r, x, gs, None, fused=False)
    got = run(r, x, gs, None, fused=True)
    assert rel(got[0], ref[0]) < 1e-6
    assert torch.equal(got[2], ref[2])
    assert rel(got[1], ref[1]) < 1e-6
    assert rel(got[3], ref[3]) < 1e-5


def test_install_and_fallbacks(monkeypatch):
    """install() replaces the forward of known router classes only; the switch, the torch backend and the auto backend
    on a CPU tensor keep the model's own forward (no fused kernel runs)."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    block = Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(hidden_size=40, moe_intermediate_size=16, num_experts=12,
                                                  num_experts_per_tok=3)).to(DEV)
    assert router.install(block) == 1
    assert router.install(block) == 0  # idempotent
    calls = []
    real = router._RouterFunction.apply
    monkeypatch.setattr(router._RouterFunction, "apply", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(9, 40, device=DEV)
    block.gate(x)
    assert len(calls) == 2  # the first call's check, then the call itself
    monkeypatch.setitem(ops.SETTINGS, "fused_router", False)
    block.gate(x)
    monkeypatch.setitem(ops.SETTINGS, "fused_router", True)
    monkeypatch.setitem(ops.SETTINGS, "backend", "torch")
    block.gate(x)
    if DEV == "cpu":  # auto: the Triton kernels on CUDA only, the interpreter never
        monkeypatch.setitem(ops.SETTINGS, "backend", "auto")
        block.gate(x)
        assert len(calls) == 2
    monkeypatch.setitem(ops.SETTINGS, "backend", "triton")
    block.gate(x)
    assert len(calls) == 3


def test_autocast_computes_in_its_dtype():
    """HF Trainer's ``bf16: true`` runs the forward under autocast: fp32 weights and input, logits in autocast's
    dtype, as the module's F.linear computes them; the gradients reach the fp32 input and weight."""
    r = make_router("qwen3_moe", hidden=64)
    r.weight.requires_grad_(True)
    x = torch.randn(33, 64, device=DEV)
    gs = torch.randn(33, 12, device=DEV)
    out = []
    for fused in (False, True):
        with torch.autocast(DEV, dtype=torch.float16):
            out.append(run(r, x, gs, None, fused=fused))
    ref, got = out
    assert got[0].dtype == ref[0].dtype == torch.float16 and got[1].dtype == ref[1].dtype == torch.float16
    assert list(router.CHECKED.values()) == [True]
    assert torch.allclose(got[0], ref[0], rtol=2.0**-10, atol=1e-3)
    assert torch.equal(got[2].sort(1).values, ref[2].sort(1).values)
    assert got[3].dtype == torch.float32 and rel(got[3], ref[3]) < 5e-3
    assert got[4]["weight"].dtype == torch.float32 and rel(got[4]["weight"], ref[4]["weight"]) < 5e-3


def test_autocast_check_allows_an_ulp_of_the_compute_dtype(monkeypatch):
    """The first call's check under autocast with an fp32 model: the kernel's half-precision logits may round 1 ulp
    away from cuBLAS's (a GPU does, the interpreter does not), which is 1 ulp of fp16, not of the fp32 input. The
    fused logits here are nudged by one fp16 ulp where they differ from the reference: the fused router stays on."""
    r = make_router("qwen3_moe", hidden=64)
    x = torch.randn(33, 64, device=DEV)
    route = router._route

    def nudged(self, hidden_states, path, dt):
        logits, scores, ids = route(self, hidden_states, path, dt)
        return torch.nextafter(logits, torch.full_like(logits, float("inf"))), scores, ids

    monkeypatch.setattr(router, "_route", nudged)
    with torch.autocast(DEV, dtype=torch.float16), warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback would warn
        run(r, x, torch.randn(33, 12, device=DEV), None, fused=True)
    assert list(router.CHECKED.values()) == [True]


def test_a_changed_router_keeps_its_own_forward(monkeypatch):
    """A transformers release whose router no longer matches the formula: the first call's check falls back, warns."""
    r = make_router("qwen3_moe")
    own = type(r).forward

    def changed(self, hidden_states):
        logits, scores, ids = own(self, hidden_states)
        return logits, scores * 2.5, ids  # e.g. a routed scaling factor

    monkeypatch.setattr(type(r), "forward", changed)
    router.install(r)
    x = torch.randn(8, 40, device=DEV)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _, scores, _ = r(x)
    assert any("no longer matches" in str(m.message) for m in w)
    assert list(router.CHECKED.values()) == [False]
    assert torch.allclose(scores, changed(r, x)[1])


def test_block_forward_backward_through_the_experts():
    """A whole sparse-MoE block (router + scattermoe experts), fused router vs the model's own: same output and
    gradients."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from host_plugin_scattermoe import experts

    experts.register()
    cfg = Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                         norm_topk_prob=True)
    cfg._experts_implementation = "scattermoe"
    torch.manual_seed(0)
    block = Qwen3MoeSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
    block = block.to(DEV)
    x = torch.randn(1, 21, 32, device=DEV)
    gout = torch.randn(1, 21, 32, device=DEV)

    def step():
        xx = x.clone().requires_grad_(True)
        block.zero_grad()
        out = block(xx)
        out.backward(gout)
        return out.detach(), xx.grad, block.gate.weight.grad.clone()

    ref = step()
    router.install(block)
    got = step()
    for a, b in zip(got, ref):
        assert rel(a, b) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 needs the compiled kernels (CUDA)")
@pytest.mark.parametrize("family,E,k", [("qwen3_moe", 128, 8), ("qwen3_5_moe", 256, 8), ("mixtral", 8, 2),
                                        ("gpt_oss", 32, 4), ("olmoe", 64, 8)])
def test_fused_router_bf16_real_shapes(family, E, k):
    """bf16 at the bench's shapes (T = 4096): the same logits, the same experts up to ties, weights and gradients
    within bf16 rounding."""
    r = make_router(family, hidden=2048, top_k=k, dtype=torch.bfloat16, experts=E)
    with torch.no_grad():
        r.weight.mul_(0.05)
    r.weight.requires_grad_(True)
    x = torch.randn(4096, 2048, device=DEV, dtype=torch.bfloat16)
    gs = torch.randn(4096, E, device=DEV)
    ref = run(r, x, gs, None, fused=False)
    got = run(r, x, gs, None, fused=True)
    # logits: fp32 sums in another order, rounded to bf16: equal, or 1 ulp apart where a sum sits at a boundary
    assert torch.allclose(got[0].float(), ref[0].float(), rtol=2.0**-7, atol=1e-6)
    assert (got[0] == ref[0]).float().mean() > 0.99
    # bf16 logits tie often: equal values may be chosen in another slot order, or (at the k-th) another of them
    same = (got[2].sort(1).values == ref[2].sort(1).values).all(1)
    assert same.float().mean() > 0.99
    assert rel(got[1][same].float().sort(1).values, ref[1][same].float().sort(1).values) < 1e-2
    assert rel(got[3], ref[3]) < 2e-2
    assert rel(got[4]["weight"], ref[4]["weight"]) < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 needs the compiled kernels (CUDA)")
def test_fp32_model_under_bf16_autocast_real_shape():
    """HF Trainer's ``bf16: true`` with an fp32 model at Qwen3-30B-A3B's router shape: the first call's check passes
    (the fused router stays on) and the results match the module's own forward under the same autocast."""
    r = make_router("qwen3_moe", hidden=2048, top_k=8, experts=128)
    with torch.no_grad():
        r.weight.mul_(0.05)
    r.weight.requires_grad_(True)
    x = torch.randn(4096, 2048, device=DEV)
    gs = torch.randn(4096, 128, device=DEV)
    out = []
    for fused in (False, True):
        with torch.autocast(DEV, dtype=torch.bfloat16):
            out.append(run(r, x, gs, None, fused=fused))
    ref, got = out
    assert list(router.CHECKED.values()) == [True]
    assert got[0].dtype == ref[0].dtype == torch.bfloat16
    assert (got[0] == ref[0]).float().mean() > 0.99
    same = (got[2].sort(1).values == ref[2].sort(1).values).all(1)
    assert same.float().mean() > 0.99
    assert got[3].dtype == torch.float32 and rel(got[3], ref[3]) < 2e-2
    assert rel(got[4]["weight"], ref[4]["weight"]) < 2e-2


def test_gradient_through_the_logits_alone():
    """Only the logits feed the loss (the scores unused): the backward takes a zero scores gradient."""
    r = make_router("qwen3_moe")
    x = torch.randn(19, 40, device=DEV)
    out = []
    for fused in (False, True):
        xx = x.clone().requires_grad_(True)
        if fused:
            router.install(r)
        logits, _, _ = r(xx)
        (logits.float() ** 2).sum().backward()
        out.append(xx.grad)
    assert rel(out[1], out[0]) < 1e-5


@pytest.mark.parametrize("model_type,extra", [
    ("qwen3_moe", {}),
    ("olmoe", {}),
    ("mixtral", {}),
    ("gpt_oss", {"num_local_experts": 5, "intermediate_size": 24, "layer_types": ["sliding_attention", "full_attention"]}),
])
def test_model_training_loss_with_aux_loss(model_type, extra, monkeypatch):
    """A tiny model of the family with peft LoRA on the experts and the load-balancing loss on
    (``output_router_logits``: transformers collects the router logits through hooks, so the logits' gradient comes
    back into the fused node): the same loss, aux loss and gradients with the fused router as with the model's own."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from host.testing import tiny_config
    from host_plugin_scattermoe import experts

    experts.register()
    cfg = tiny_config(model_type, 96, output_router_logits=True, router_aux_loss_coef=0.5, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(DEV)
    model.set_experts_implementation("scattermoe")
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                                          init_lora_weights=False))
    assert router.install(pm) == 2
    calls = []
    real = router._RouterFunction.apply
    monkeypatch.setattr(router._RouterFunction, "apply", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1)).to(DEV)
    res = []
    for fused in (False, True):
        monkeypatch.setitem(ops.SETTINGS, "fused_router", fused)
        pm.zero_grad(set_to_none=True)
        out = pm(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
        res.append((out.loss.detach(), out.aux_loss.detach(), grads))
    assert len(calls) >= 2  # both layers' routers ran fused (plus the first call's check)
    (l0, a0, g0), (l1, a1, g1) = res
    assert rel(l1, l0) < 1e-5 and rel(a1, a0) < 1e-5
    for n in g0:
        assert rel(g1[n], g0[n]) < 1e-4, n


def test_specs_name_the_routers_install_finds():
    """Every fused class is transformers' own (dotted path), and install() finds each of them in a model."""
    for path in router.SPECS:
        module, cls = path.rsplit(".", 1)
        assert hasattr(importlib.import_module(module), cls), path
    for family in FAMILIES:
        r = make_router(family)
        assert router.install(r) == 1, family


def test_gpt_oss_router_keeps_a_3d_input_to_its_own_forward():
    """gpt-oss's router does not flatten its input (its MLP passes ``[T, H]``): a 3-D input keeps the module's forward
    and the module's output shapes; the Qwen routers flatten, so theirs is fused either way."""
    r = make_router("gpt_oss")
    router.install(r)
    x = torch.randn(2, 5, 40, device=DEV)
    logits, scores, ids = r(x)
    assert logits.shape == (2, 5, 12) and scores.shape == (2, 5, 3)
    assert router.CHECKED == {}  # never fused: no first-call check ran
    q = make_router("qwen3_moe")
    router.install(q)
    logits, scores, _ = q(x)
    assert logits.shape == (10, 12) and router.CHECKED == {router.class_path(q): True}
