"""The experts call as one autograd node (``ops.glu_experts``) against the separate nodes it replaces, and the direct
launch cache's specialisation key (CPU, ``TRITON_INTERPRET=1``: the Triton kernels run in the interpreter).

With its old backward (``SETTINGS["light_tail"]`` off) the merged node launches the same kernels with the same
arguments in the same order, so its output and every gradient must be bitwise identical to the separate nodes' (and
close to the torch reference). Its default light tail folds the combine's backward into the down projection's dX
launch (the routing weight applied after that GEMM in fp32 instead of to its input): the output stays bitwise, the
gradients equal within rounding (``test_scattermoe_light_tail.py``)."""

import pytest
import torch

from host_plugin_scattermoe import kernels as K
from host_plugin_scattermoe import launch, ops, reference
from host_plugin_scattermoe.routing import sort_tokens
from host_plugin_scattermoe.testing import DEV, TRITON_RUNS

pytestmark = pytest.mark.skipif(not TRITON_RUNS, reason="Triton needs CUDA or TRITON_INTERPRET=1")


def _problem(dtype, lora_dtype, seed=0, E=4, H=32, I=16, k=2, T=8, r=4):
    g = torch.Generator().manual_seed(seed)

    def rn(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(DEV)

    W1 = (rn(E, 2 * I, H, scale=H**-0.5)).to(dtype)  # transformers layout [E, 2I, H]
    W2 = (rn(E, H, I, scale=I**-0.5)).to(dtype)
    # peft's flattened factors: lora_A (r*E, in) expert-major, lora_B (out, r*E) rank-major
    wa1, wb1 = rn(E * r, H, scale=H**-0.5).to(lora_dtype), rn(2 * I, r * E, scale=0.5).to(lora_dtype)
    wa2, wb2 = rn(E * r, I, scale=I**-0.5).to(lora_dtype), rn(H, r * E, scale=0.5).to(lora_dtype)
    x = rn(T, H).to(dtype)
    logits = rn(T, E)
    wts, idx = logits.softmax(-1).topk(k, dim=1)
    return dict(W1=W1, W2=W2, wa1=wa1, wb1=wb1, wa2=wa2, wb2=wb2, x=x, gates=wts, idx=idx, E=E, k=k, r=r)


def _run(p, merged, grads, s1=2.0, s2=0.5, lora=True):
    """Forward + backward of the experts MLP; ``grads``: names of the leaves that require grad."""
    leaves = {n: p[n].detach().clone().requires_grad_(n in grads) for n in ("x", "W1", "W2", "wa1", "wb1", "wa2", "wb2", "gates")}
    E, k, r = p["E"], p["k"], p["r"]
    sei, ssi, offs = sort_tokens(p["idx"], E)
    W1k, W2k = leaves["W1"].transpose(1, 2), leaves["W2"].transpose(1, 2)

    def factors(wa, wb, s):
        return (wa.view(E, r, wa.shape[1]), wb.view(wb.shape[0], r, E).permute(2, 0, 1), s) if lora else None

    l1, l2 = factors(leaves["wa1"], leaves["wb1"], s1), factors(leaves["wa2"], leaves["wb2"], s2)
    x = leaves["x"]
    if merged:
        out = ops.glu_experts(x, W1k, W2k, k, sei, ssi, offs, l1, l2, leaves["gates"])
    else:
        A1, B1, s1_ = l1 if l1 else (None, None, 0.0)
        A2, B2, s2_ = l2 if l2 else (None, None, 0.0)
        h = ops.scattered_experts(x, W1k, k, sei, ssi, offs, A1, B1, s1_, None, False, True, backend="triton")
        h = ops.silu_glu(h, backend="triton")
        y = ops.scattered_experts(h, W2k, 1, sei, ssi, offs, A2, B2, s2_, None, True, False, backend="triton")
        out = ops.combine(y, leaves["gates"], backend="triton")
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(DEV, out.dtype)
    out.backward(dout)
    return out.detach(), {n: leaves[n].grad for n in grads}, (leaves, l1, l2, sei, ssi, offs, dout)


CASES = {
    "all LoRA + x + gates": ("x", "wa1", "wb1", "wa2", "wb2", "gates"),
    "down LoRA only": ("wa2", "wb2"),
    "up LoRA B only + gates": ("wb1", "gates"),
    "full fine-tune": ("x", "W1", "W2"),
    "x only": ("x",),
}


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float16, torch.float32)], ids=["fp32", "fp16-lora-fp32"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_merged_node_is_bitwise_the_separate_nodes(case, dtypes, monkeypatch):
    """The old backward (light tail off): bitwise the separate nodes. The light tail's numbers intentionally differ
    by rounding (its own tests compare them with these and with the float64 reference)."""
    monkeypatch.setitem(ops.SETTINGS, "backend", "triton")
    monkeypatch.setitem(ops.SETTINGS, "light_tail", False)
    # the SiLU-GLU in the up projection's epilogue is bitwise the separate launches, except in fp32 under the
    # interpreter, whose fp32 dot (OpenBLAS) rounds a column by its place in the tile (test_scattermoe_glu_epilogue)
    monkeypatch.setitem(ops.SETTINGS, "glu_epilogue", not (K.INTERPRET and dtypes[0] == torch.float32))
    p = _problem(*dtypes)
    grads = CASES[case]
    out_m, g_m, _ = _run(p, True, grads)
    out_s, g_s, _ = _run(p, False, grads)
    assert torch.equal(out_m, out_s)
    for n in grads:
        assert g_m[n] is not None and g_s[n] is not None, n
        assert g_m[n].dtype == g_s[n].dtype == p[n].dtype, n
        assert torch.equal(g_m[n], g_s[n]), (n, (g_m[n] - g_s[n]).abs().max())


@pytest.mark.parametrize("light", [True, False], ids=["light-tail", "old-tail"])
@pytest.mark.parametrize("split", [False, True], ids=["fused-lora", "split-lora"])
def test_merged_node_matches_reference(split, light, monkeypatch):
    """fp32 against the torch reference (the separate nodes' own oracle), both LoRA forward paths, both backwards;
    one projection's scaling 0 drops its factors (no gradient)."""
    monkeypatch.setitem(ops.SETTINGS, "backend", "triton")
    monkeypatch.setitem(ops.SETTINGS, "light_tail", light)
    monkeypatch.setitem(ops.SETTINGS, "fused_lora", not split)
    p = _problem(torch.float32, torch.float32, seed=3)
    grads = ("x", "wa1", "wb1", "wa2", "wb2", "gates")
    out, g, (leaves, l1, l2, sei, ssi, offs, dout) = _run(p, True, grads, s2=0.0)
    assert g["wa2"] is None and g["wb2"] is None
    ref = {n: t.detach().clone().requires_grad_(True) for n, t in leaves.items()}
    E, k, r = p["E"], p["k"], p["r"]
    A1, B1 = ref["wa1"].view(E, r, -1), ref["wb1"].view(-1, r, E).permute(2, 0, 1)
    h = reference.scattered_linear(ref["x"], ref["W1"].transpose(1, 2), k, sei, ssi, offs, A1, B1, 2.0, None, False, True)
    y = reference.scattered_linear(reference.glu(h), ref["W2"].transpose(1, 2), 1, sei, ssi, offs, None, None, 0.0,
                                   None, True, False)
    want = reference.combine(y, ref["gates"])
    want.backward(dout)
    assert torch.allclose(out, want, rtol=1e-4, atol=1e-5)
    for n in ("x", "wa1", "wb1", "gates"):
        assert torch.allclose(g[n], ref[n].grad, rtol=1e-4, atol=1e-5), n


@pytest.mark.parametrize("epilogue", [True, False], ids=["glu-epilogue", "glu-kernel"])
@pytest.mark.parametrize("light", [True, False], ids=["light-tail", "old-tail"])
def test_merged_node_frees_activations_in_backward(light, epilogue, monkeypatch):
    """Peak memory at most the separate nodes': y is gone before the down projection's backward (light tail: y is not
    kept at all), h and act before the up projection's; a second backward through the node says why it cannot run
    (retain_graph)."""
    import weakref

    monkeypatch.setitem(ops.SETTINGS, "backend", "triton")
    monkeypatch.setitem(ops.SETTINGS, "light_tail", light)
    monkeypatch.setitem(ops.SETTINGS, "glu_epilogue", epilogue)
    p = _problem(torch.float32, torch.float32, seed=5)
    seen = {}
    real_combine, real_silu, real_silu_bwd = K.combine, K.silu_glu_fwd, K.silu_glu_bwd
    monkeypatch.setattr(K, "combine", lambda y, g, *a: seen.setdefault("y", weakref.ref(y)) and real_combine(y, g, *a))
    monkeypatch.setattr(K, "silu_glu_fwd", lambda h: seen.setdefault("h", weakref.ref(h)) and real_silu(h))
    real_up = ops.lora_linear_fwd

    def up(*a, act_out=None, **kw):  # the up projection with the SiLU-GLU in its epilogue: h is its output
        h, xa = real_up(*a, act_out=act_out, **kw)
        if act_out is not None:
            seen.setdefault("h", weakref.ref(h))
        return h, xa

    monkeypatch.setattr(ops, "lora_linear_fwd", up)
    alive = {}

    def silu_bwd(h, d):
        alive["y at gate backward"] = seen["y"]() is not None
        return real_silu_bwd(h, d)

    monkeypatch.setattr(K, "silu_glu_bwd", silu_bwd)
    real_gate_bwd = K.silu_glu_gate_bwd

    def gate_bwd(h, d, *a):  # the light tail's GLU backward
        alive["y at gate backward"] = seen["y"]() is not None
        return real_gate_bwd(h, d, *a)

    monkeypatch.setattr(K, "silu_glu_gate_bwd", gate_bwd)
    real_pb = ops.proj_backward

    def pb(dy, x, *a):
        if x is None or x.shape[0] == p["x"].shape[0]:  # the up projection's backward (x: the tokens)
            alive["h at up backward"] = seen["h"]() is not None
        return real_pb(dy, x, *a)

    monkeypatch.setattr(ops, "proj_backward", pb)
    leaves = [p[n].detach().clone().requires_grad_(True) for n in ("x", "wa1", "wb1")]
    E, r, k = p["E"], p["r"], p["k"]
    sei, ssi, offs = sort_tokens(p["idx"], E)
    l1 = (leaves[1].view(E, r, -1), leaves[2].view(-1, r, E).permute(2, 0, 1), 2.0)
    out = ops.glu_experts(leaves[0], p["W1"].transpose(1, 2), p["W2"].transpose(1, 2), k, sei, ssi, offs, l1, None, p["gates"])
    assert (seen["y"]() is None) == light, "y kept for the backward only by the old tail"
    out.sum().backward(retain_graph=True)
    assert alive == {"y at gate backward": False, "h at up backward": False}, alive
    with pytest.raises(RuntimeError, match="SCATTERMOE_MERGED=0"):
        out.sum().backward()


def test_merged_node_not_under_saved_tensor_hooks():
    """Under saved-tensor hooks (non-reentrant checkpointing, offloading) the experts keep the separate nodes, whose
    saved activations the hooks see."""
    from host_plugin_scattermoe import experts

    class Mod:
        has_gate = True
        act_fn = torch.nn.SiLU()

    from transformers.integrations.moe import _default_apply_gate

    Mod._apply_gate = _default_apply_gate
    x = torch.empty(2, 2, device=DEV)
    old = ops.SETTINGS["backend"]
    ops.SETTINGS["backend"] = "triton"
    try:
        assert experts._merged_applies(Mod(), x)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            assert not experts._merged_applies(Mod(), x)
    finally:
        ops.SETTINGS["backend"] = old


def test_spec_key_is_at_least_as_fine_as_tritons():
    """Everything Triton specialises a runtime argument on changes the key: an int's value (1, multiples of 16,
    width), a tensor's dtype and 16-byte alignment; a float's value does not; an unknown kind gives no key."""
    t = torch.empty(64, dtype=torch.float32)
    base = launch.spec_key((t, 16, 2.0))
    assert base == launch.spec_key((torch.empty(8, dtype=torch.float32), 16, 3.5))
    assert base != launch.spec_key((t[1:], 16, 2.0))  # 4-byte offset: no longer 16-byte aligned
    assert base == launch.spec_key((t[4:], 16, 2.0))  # 16-byte offset: still aligned
    assert base != launch.spec_key((t.to(torch.float16), 16, 2.0))
    assert len({launch.spec_key((t, v, 2.0)) for v in (1, 2, 16, 17, 2**31, 2**31 - 16)}) == 6
    assert launch.spec_key((t, True, 2.0)) != launch.spec_key((t, 1, 2.0))
    assert launch.spec_key((t, None)) != launch.spec_key((t, 0))
    assert launch.spec_key((t, object())) is None


@pytest.mark.skipif(not torch.cuda.is_available() or K.INTERPRET, reason="needs CUDA (not the interpreter)")
def test_direct_launch_is_bitwise_the_normal_launch(monkeypatch):
    """GPU: a real-shape experts call (cached launch plans) forward + backward through the direct launch cache gives
    bitwise the normal ``kernel[grid]`` path's tensors; on repeats no plan kernel goes through ``JITFunction.run``;
    a misaligned input (another Triton specialisation) takes a new entry and still matches."""
    monkeypatch.setattr(K, "_PLANS", {})
    monkeypatch.setattr(K, "_SMALL_SLOTS", {})
    torch.manual_seed(0)
    E, H, I, k, T, r = 128, 2048, 768, 8, 2048, 16
    dt = torch.bfloat16
    W1 = (torch.randn(E, 2 * I, H, device="cuda") * H**-0.5).to(dt).transpose(1, 2)
    W2 = (torch.randn(E, H, I, device="cuda") * I**-0.5).to(dt).transpose(1, 2)
    f1 = ((torch.randn(E, r, H, device="cuda") * H**-0.5), torch.randn(E, 2 * I, r, device="cuda") * 0.3, 2.0)
    f2 = ((torch.randn(E, r, I, device="cuda") * I**-0.5), torch.randn(E, H, r, device="cuda") * 0.3, 2.0)
    xbuf = torch.randn(T * H + 1, device="cuda").to(dt)
    wts, idx = torch.randn(T, E, device="cuda").softmax(-1).topk(k, dim=1)
    sei, ssi, offs = sort_tokens(idx, E)
    dout = torch.randn(T, H, device="cuda").to(dt)

    def step(x):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, f1[0], f1[1], f2[0], f2[1], wts)]
        out = ops.glu_experts(leaves[0], W1, W2, k, sei, ssi, offs, (leaves[1], leaves[2], 2.0),
                              (leaves[3], leaves[4], 2.0), leaves[5])
        out.backward(dout)
        return [out.detach()] + [t.grad for t in leaves]

    calls = {}
    for kern in (K._s2s_kernel, K._group_outer_kernel, K._combine_kernel, K._silu_glu_fwd_kernel):
        real = kern.run
        monkeypatch.setattr(kern, "run", lambda *a, _real=real, _n=kern.fn.__name__, **kw: calls.__setitem__(
            _n, calls.get(_n, 0) + 1) or _real(*a, **kw))
    for x in (xbuf[:T * H].view(T, H), xbuf[1:].view(T, H)):  # aligned, then 2 bytes off (no divisibility)
        monkeypatch.setattr(launch, "ENABLED", False)
        want = step(x)
        monkeypatch.setattr(launch, "ENABLED", True)
        first = step(x)
        calls.clear()
        again = step(x)
        torch.cuda.synchronize()
        assert not calls, f"normal launches on a repeat: {calls}"
        for w, a, b in zip(want, first, again):
            assert torch.equal(w, a) and torch.equal(w, b)
    entries = [v for plan in K._PLANS.values() for v in (plan[-1].values() if isinstance(plan[-1], dict) else ())]
    assert any(isinstance(v, launch._Entry) for v in entries) or any(
        isinstance(e, launch._Entry) for v in entries if isinstance(v, tuple) for e in v[1].values()
    )


class _FakeParam:
    def __init__(self, name, constexpr, default=None):
        self.name, self.is_constexpr, self.default, self.has_default = name, constexpr, default, default is not None


class _FakeKernel:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kw)`` records the normal launch and returns a compiled
    kernel whose C launcher records the direct ones."""

    def __init__(self):
        self.params = [_FakeParam("X", False), _FakeParam("N", False), _FakeParam("s", False),
                       _FakeParam("BLOCK", True), _FakeParam("FLAG", True, default=7)]
        self.pre_run_hooks = []
        self.normal, self.direct = [], []
        kern = self

        class Compiled:
            function, packed_metadata = "fn", "meta"

            def run(self, *a):
                kern.direct.append(a)

        self.compiled = Compiled()

    def __getitem__(self, grid):
        def runner(*args, **kw):
            self.normal.append((grid, args, kw))
            return self.compiled
        return runner


def test_direct_launch_mechanics(monkeypatch):
    """CPU: the first launch of a slot goes through ``kernel[grid]``; a repeat with arguments of the same kinds calls
    the compiled kernel's launcher with (grid, stream, function, metadata, no hooks, runtime args, constexprs in
    parameter order with defaults); another alignment is a new entry; installed launch hooks or the switch off take
    the normal path."""
    monkeypatch.setattr(launch, "ENABLED", True)
    monkeypatch.setattr(launch, "_DRIVER", (lambda: 0, lambda dev: 1234))

    class Hooks:
        calls = []

    class RT:
        launch_enter_hook = Hooks()
        launch_exit_hook = Hooks()

    monkeypatch.setattr(launch, "_RT", RT)
    k, slot = _FakeKernel(), {}
    t = torch.empty(64)
    for _ in range(3):
        launch.launch(k, (5, 1, 1), (t, 16, 0.5), {"BLOCK": 32, "num_warps": 4}, slot)
    assert len(k.normal) == 1 and len(k.direct) == 2
    assert k.direct[0] == (5, 1, 1, 1234, "fn", "meta", None, None, None, t, 16, 0.5, 32, 7)
    launch.launch(k, (5, 1, 1), (t[1:], 16, 0.5), {"BLOCK": 32, "num_warps": 4}, slot)  # misaligned: new entry
    launch.launch(k, (5, 1, 1), (t, 17, 0.5), {"BLOCK": 32, "num_warps": 4}, slot)  # another int: new entry
    assert len(k.normal) == 3 and len(slot) == 3
    RT.launch_enter_hook = type("H", (), {"calls": [print]})()  # a profiler's hook: normal path
    launch.launch(k, (5, 1, 1), (t, 16, 0.5), {"BLOCK": 32, "num_warps": 4}, slot)
    assert len(k.normal) == 4 and len(k.direct) == 2
    RT.launch_enter_hook = Hooks()
    monkeypatch.setattr(launch, "ENABLED", False)
    launch.launch(k, (5, 1, 1), (t, 16, 0.5), {"BLOCK": 32, "num_warps": 4}, slot)
    assert len(k.normal) == 5 and len(k.direct) == 2
    monkeypatch.setattr(launch, "ENABLED", True)
    monkeypatch.setattr(launch, "MAX_SPECS", 3)
    launch.launch(k, (5, 1, 1), (t, 18, 0.5), {"BLOCK": 32, "num_warps": 4}, slot)  # full: cleared, then added
    assert len(slot) == 1
    k2 = _FakeKernel()
    k2.params.insert(1, k2.params.pop(3))  # a constexpr between runtime parameters: never direct
    slot2 = {}
    for _ in range(2):
        launch.launch(k2, (1, 1, 1), (t, 16, 0.5), {"BLOCK": 32}, slot2)
    assert len(k2.normal) == 2 and not k2.direct and list(slot2.values()) == [False]
