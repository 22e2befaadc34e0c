"""The SiLU-GLU in the up projection's epilogue (``kernels.scatter2scatter(act_out=...)``, ``GLU_FWD``) against the two
launches it replaces (the up projection, then ``silu_glu_fwd``): ``h``, ``act`` and the rank intermediate must be
bitwise equal (interpreter on CPU in fp32/fp16, native on CUDA), and the merged experts node must give bitwise the same
output and gradients with the epilogue on and off (``SETTINGS["glu_epilogue"]``).

The interpreter's fp32 ``tl.dot`` is numpy's matmul, i.e. OpenBLAS, whose rounding of a column depends on its position
in the tile (the epilogue's half tiles put the up columns elsewhere than the plain launch's tiles: the last bit
differs); its fp16 dot is numpy's own loop, which does not. So under the interpreter fp32 compares ``h`` within
rounding (and ``act`` bitwise against ``silu_glu_fwd`` of the launch's own ``h``), fp16 everything bitwise; on a GPU
both bitwise, and the merged node's fp32 on/off comparison runs on a GPU only."""

import pytest
import torch

from host_plugin_scattermoe import kernels as K
from host_plugin_scattermoe import ops, reference
from host_plugin_scattermoe.routing import sort_tokens
from host_plugin_scattermoe.testing import DEV, TOL, TRITON_RUNS, record_tma_descriptors, rel

pytestmark = pytest.mark.skipif(not TRITON_RUNS, reason="Triton needs CUDA or TRITON_INTERPRET=1")


def _problem(T, E, H, I, k, r, dtype, seed, bias=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEV, dtype)

    x = rnd(T, H)
    W = rnd(E, 2 * I, H, scale=H**-0.5).transpose(1, 2)  # transformers' [E, 2I, H] storage, kernel view [E, H, 2I]
    A = rnd(E, r, H, scale=H**-0.5)
    B = rnd(E, 2 * I, r, scale=r**-0.5)
    b = rnd(E, 2 * I, scale=0.1) if bias else None
    # expert 1 gets no rows; the others a mix of full, more-than-half and at-most-half last row blocks
    scores = torch.rand(T, E, generator=g)
    scores[:, 1] = -1.0
    sei, ssi, offs = sort_tokens(scores.topk(k, dim=1).indices.to(DEV), E)
    return x, W, A, B, b, sei, ssi, offs


def _same(a, b):
    """Bitwise, except fp32 under the interpreter (OpenBLAS: see the module doc): within 2 ulp-ish rounding."""
    if K.INTERPRET and a.dtype == torch.float32:
        return torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    return torch.equal(a, b)


def _both(x, W, A, B, b, ssi, offs, k, lora, gin, gout):
    """``(h, act, xa)`` from one launch with the epilogue, and from the up projection + ``silu_glu_fwd``."""
    xin = x[ssi // k].contiguous() if gin else x
    fan = 1 if gin else k
    L, I = ssi.numel(), W.shape[2] // 2
    out = []
    for fused in (True, False):
        act = torch.empty(L, I, device=DEV, dtype=x.dtype) if fused else None
        if lora == "none":
            h, xa = ops.lora_linear_fwd(xin, W, ssi, offs, fan, None, None, 0.0, b, gin, gout, False, False, act_out=act)
        else:
            h, xa = ops.lora_linear_fwd(xin, W, ssi, offs, fan, A, B, 0.7, b, gin, gout, lora == "split", True,
                                        act_out=act)
        if fused:  # act is silu_glu_fwd's of the h this launch wrote, whatever the GEMM's rounding
            assert torch.equal(act, K.silu_glu_fwd(h))
        out.append((h, act if fused else K.silu_glu_fwd(h), xa))
    return out


# (name, E, H, I, T, top_k, gpt-oss): the rule's tiles there (TMA 128x256 with half tails at >= 160 rows per expert,
# 128x128 pointer loads at Qwen3.5's 128)
REAL = [
    ("qwen3-30b-a3b", 128, 2048, 768, 4096, 8, False),
    ("qwen3.5-35b-a3b", 256, 2048, 512, 4096, 8, False),
    ("gpt-oss-20b (bias, clamped)", 32, 2880, 2880, 2048, 4, True),
]


@pytest.mark.skipif(K.INTERPRET, reason="bf16 at real shapes: GPU only")
@pytest.mark.parametrize("shape", REAL, ids=[r[0] for r in REAL])
def test_bf16_real_shapes_bitwise(shape):
    """First in this file (a time-boxed GPU run reaches it): bf16, the rule's tiles, LoRA r = 16 fused as the block
    runs it: h and act bitwise the plain launch + the GLU kernel."""
    name, E, H, I, T, k, gpt = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    dt = torch.bfloat16

    def rnd(*shape_, scale=1.0):
        return (torch.randn(*shape_, device="cuda", generator=g) * scale).to(dt)

    W = rnd(E, H, 2 * I, scale=4 * H**-0.5) if gpt else rnd(E, 2 * I, H, scale=H**-0.5).transpose(1, 2)
    b = rnd(E, 2 * I, scale=0.1) if gpt else None
    A, B = ops.kernel_strides(rnd(E, 16, H, scale=H**-0.5), rnd(E, 2 * I, 16, scale=0.3))
    x = rnd(T, H)
    sei, ssi, offs = sort_tokens(torch.randn(T, E, device="cuda", generator=g).topk(k, dim=1).indices, E)
    clamp = (1.702, 7.0) if gpt else None
    act = torch.empty(T * k, I, device="cuda", dtype=dt)
    h, xa = ops.lora_linear_fwd(x, W, ssi, offs, k, A, B, 2.0, b, False, True, False, True, act_out=act, act_clamp=clamp)
    h2, xa2 = ops.lora_linear_fwd(x, W, ssi, offs, k, A, B, 2.0, b, False, True, False, True)
    act2 = K.silu_glu_fwd(h2) if clamp is None else K.clamped_glu_fwd(h2, *clamp)
    assert torch.equal(h, h2), (name, (h.float() - h2.float()).abs().max())
    assert torch.equal(act, act2), (name, (act.float() - act2.float()).abs().max())
    assert torch.equal(xa, xa2)


TILES = {  # interpreter tiles (BLOCK_N is the tile's output width: 16 gate + 16 up columns under the epilogue)
    "ptr": ({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 3}, "0"),
    "tma": ({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 3}, "1"),
    "tma+half-tail": ({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 3, "HALF_TAIL": True}, "1"),
    "ptr+persistent+half-tail": (
        {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 3, "HALF_TAIL": True, "PERSISTENT": True}, "0"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lora", ["fused", "split", "none"])
@pytest.mark.parametrize("tiles", list(TILES))
def test_epilogue_is_bitwise_the_two_launches(monkeypatch, tiles, lora, dtype):
    """Gathered x -> grouped h (the merged node's up projection) with and without LoRA (fused, split), I = 19 (not a
    multiple of the 16-column half tile: the last block's gate tile reaches into the up columns, masked), H = 40 (not
    a multiple of BLOCK_K), several row blocks per expert with short last ones, an idle expert; pointer loads, TMA
    descriptors, half-height tail tiles, the persistent grid."""
    cfg, tma = TILES[tiles]
    if K.INTERPRET:
        monkeypatch.setattr(K, "INTERP_S2S", cfg)
    else:
        monkeypatch.setattr(K, "FORCE", {"s2s": {**K._cfg(64, 64, 32, 3, 4, 3), **{k: v for k, v in cfg.items()
                                                                                  if k in ("HALF_TAIL", "PERSISTENT")}}})
    monkeypatch.setattr(K, "TMA_MODE", tma)
    plans = []
    real = K._s2s_plan
    monkeypatch.setattr(K, "_s2s_plan", lambda *a: plans.append(real(*a)) or plans[-1])
    T, E, H, I, k, r = 29, 5, 40, 19, 2, 8
    x, W, A, B, _, sei, ssi, offs = _problem(T, E, H, I, k, r, dtype, seed=3)
    (h, act, xa), (h2, act2, xa2) = _both(x, W, A, B, None, ssi, offs, k, lora, False, True)
    assert _same(h, h2), (h - h2).abs().max()
    assert _same(act, act2), (act - act2).abs().max()
    assert (xa is None) == (lora == "none") and (xa is None or torch.equal(xa, xa2))
    glu = [p for p in plans if p[1]["GLU_FWD"]]
    assert not any(p[1]["GLU_FWD"] for p in plans if p not in glu) and len(glu) == 1
    assert glu and all(p[1]["BLOCK_N"] * 2 == (cfg["BLOCK_N"] if K.INTERPRET else 64) for p in glu), "half-width tiles"
    assert all(p[3] == (tma == "1") for p in glu)
    # and against the reference (the separate path is itself tested there; this checks the problem is not trivial)
    want = reference.glu(reference.scattered_linear(
        x.double(), W.double(), k, sei, ssi, offs, A.double() if lora != "none" else None,
        B.double() if lora != "none" else None, 0.7, None, False, True))
    assert rel(act, want) < TOL[dtype]


@pytest.mark.parametrize("w_layout", ["stored [2I, H]", "stored [H, 2I]"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_epilogue_other_layouts_and_bias(monkeypatch, dtype, w_layout):
    """The epilogue in every grouped/scattered layout, with a bias (not a SiLU family's, but the kernel takes one),
    fused LoRA, W through TMA descriptors in both storage layouts (the up half's box at expert row ``e·2I + I + n0``,
    or column ``I + n0``): bitwise the two launches."""
    taken = record_tma_descriptors(monkeypatch, small_tiles=False)
    T, E, H, I, k, r = 13, 6, 40, 24, 2, 16  # H: rows of 16-byte multiples (a descriptor's rule), not of BLOCK_K
    x, W, A, B, b, sei, ssi, offs = _problem(T, E, H, I, k, r, dtype, seed=5, bias=True)
    if w_layout == "stored [H, 2I]":
        W = W.contiguous()
    for gin, gout in [(False, True), (True, False), (False, False), (True, True)]:
        (h, act, xa), (h2, act2, xa2) = _both(x, W, A, B, b, ssi, offs, k, "fused", gin, gout)
        assert _same(h, h2) and _same(act, act2) and torch.equal(xa, xa2), (gin, gout)
    assert {t[0] for t in taken} == {1 if w_layout == "stored [2I, H]" else 2}


def test_act_out_is_checked():
    T, E, H, I, k, r = 6, 3, 16, 8, 2, 4
    x, W, A, B, _, sei, ssi, offs = _problem(T, E, H, I, k, r, torch.float32, seed=1)
    with pytest.raises(ValueError, match="act_out must be"):
        K.scatter2scatter(x, W, ssi, offs, k, grouped_out=True, act_out=torch.empty(T * k, I + 1, device=DEV))
    with pytest.raises(ValueError, match="even output width"):
        K.scatter2scatter(x, W[:, :, 1:], ssi, offs, k, grouped_out=True, act_out=torch.empty(T * k, I, device=DEV))


@pytest.mark.parametrize("bias", [False, True], ids=["", "biases"])
@pytest.mark.parametrize("split", [False, True], ids=["fused-lora", "split-lora"])
@pytest.mark.parametrize("dtype", [
    pytest.param(torch.float32, marks=pytest.mark.skipif(K.INTERPRET, reason="OpenBLAS's fp32 rounding (module doc)")),
    torch.float16,
], ids=["fp32", "fp16"])
def test_merged_node_bitwise_with_and_without_epilogue(monkeypatch, dtype, split, bias):
    """``ops.glu_experts`` (the default light tail) with ``SETTINGS["glu_epilogue"]`` on and off: the same output and
    gradients, bit for bit (act and h are bitwise the same, so is everything downstream); with trainable biases on
    both projections (the SiLU gate with ``b1``: the epilogue adds it to both halves)."""
    monkeypatch.setitem(ops.SETTINGS, "backend", "triton")
    monkeypatch.setitem(ops.SETTINGS, "fused_lora", not split)
    T, E, H, I, k, r = 11, 4, 32, 20, 2, 4
    g = torch.Generator().manual_seed(9)

    def rn(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(DEV)

    W1, W2 = rn(E, 2 * I, H, scale=H**-0.5).to(dtype), rn(E, H, I, scale=I**-0.5).to(dtype)
    wa1, wb1 = rn(E, r, H, scale=H**-0.5), rn(E, 2 * I, r, scale=0.5)
    wa2, wb2 = rn(E, r, I, scale=I**-0.5), rn(E, H, r, scale=0.5)
    x = rn(T, H).to(dtype)
    wts, idx = rn(T, E).softmax(-1).topk(k, dim=1)
    sei, ssi, offs = sort_tokens(idx, E)
    dout = rn(T, H).to(dtype)
    b1, b2 = rn(E, 2 * I, scale=0.1).to(dtype), rn(E, H, scale=0.1).to(dtype)
    _assert_epilogue_invisible(
        monkeypatch, (x, wa1, wb1, wa2, wb2, wts) + ((b1, b2) if bias else ()), dout,
        lambda lv: ops.glu_experts(lv[0], W1.transpose(1, 2), W2.transpose(1, 2), k, sei, ssi, offs,
                                   (lv[1], lv[2], 2.0), (lv[3], lv[4], 0.5), lv[5],
                                   b1=lv[6] if bias else None, b2=lv[7] if bias else None),
    )


def _assert_epilogue_invisible(monkeypatch, tensors, dout, call):
    """``call(leaves)`` (the merged node) with the GLU epilogue on, then off: output and gradients bitwise equal."""
    res = []
    for on in (True, False):
        monkeypatch.setitem(ops.SETTINGS, "glu_epilogue", on)
        leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
        out = call(leaves)
        out.backward(dout)
        res.append((out.detach(), [t.grad for t in leaves]))
    (o1, g1), (o2, g2) = res
    assert torch.equal(o1, o2)
    for a, b in zip(g1, g2):
        assert a is not None and torch.equal(a, b)


ALPHA, LIMIT = 1.702, 7.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lora", ["fused", "split", "none"])
@pytest.mark.parametrize("tiles", ["ptr", "tma", "tma+half-tail"])
@pytest.mark.parametrize("w_layout", ["stored [H, 2I]", "stored [2I, H]"])
def test_clamped_epilogue_is_bitwise_the_two_launches(monkeypatch, w_layout, tiles, lora, dtype):
    """gpt-oss (``act_clamp``): interleaved gate/up columns, the clamped sigmoid-GLU from the plain tile's column pairs;
    bitwise the plain launch + ``clamped_glu_fwd`` (the same tiles, so fp32 too), with a bias, values crossing the
    clamp, I = 19 (the last tile's pairs partly past 2I), W in both storage layouts (gpt-oss's is ``[H, 2I]``)."""
    cfg, tma = TILES[tiles]
    if K.INTERPRET:
        monkeypatch.setattr(K, "INTERP_S2S", cfg)
    else:
        monkeypatch.setattr(K, "FORCE", {"s2s": {**K._cfg(64, 64, 32, 3, 4, 3), **{k: v for k, v in cfg.items()
                                                                                  if k == "HALF_TAIL"}}})
    monkeypatch.setattr(K, "TMA_MODE", tma)
    T, E, H, I, k, r = 29, 5, 40, 19, 2, 8
    x, W, A, B, b, sei, ssi, offs = _problem(T, E, H, I, k, r, dtype, seed=4, bias=True)
    W = W * 6.0  # h's spread crosses ±LIMIT
    if w_layout == "stored [H, 2I]":
        W = W.contiguous()
    L = ssi.numel()
    res = []
    for fused in (True, False):
        act = torch.empty(L, I, device=DEV, dtype=dtype) if fused else None
        la, lb = (A, B) if lora != "none" else (None, None)
        h, xa = ops.lora_linear_fwd(x, W, ssi, offs, k, la, lb, 0.7, b, False, True, lora == "split", lora != "none",
                                    act_out=act, act_clamp=(ALPHA, LIMIT) if fused else None)
        res.append((h, act if fused else K.clamped_glu_fwd(h, ALPHA, LIMIT), xa))
    (h, act, xa), (h2, act2, xa2) = res
    assert torch.equal(h, h2) and torch.equal(act, act2), ((h - h2).abs().max(), (act - act2).abs().max())
    assert xa is None or torch.equal(xa, xa2)
    hf = h.float()
    assert (hf[:, 0::2] > LIMIT).any() and (hf[:, 1::2].abs() > LIMIT).any(), "values cross the clamp"
    want = reference.gpt_oss_glu(h.double(), ALPHA, LIMIT)
    assert rel(act, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_merged_gpt_oss_node_bitwise_with_and_without_epilogue(monkeypatch, dtype):
    """``ops.glu_experts`` with ``clamp`` (gpt-oss: interleaved W1 ``[E, H, 2I]``, biases, LoRA, the light tail), the
    epilogue on and off: the same output and gradients, bit for bit."""
    monkeypatch.setitem(ops.SETTINGS, "backend", "triton")
    T, E, H, I, k, r = 11, 4, 32, 20, 2, 4
    g = torch.Generator().manual_seed(10)

    def rn(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(DEV)

    W1, W2 = rn(E, H, 2 * I, scale=6 * H**-0.5).to(dtype), rn(E, I, H, scale=I**-0.5).to(dtype)
    wa1, wb1 = rn(E, r, H, scale=H**-0.5), rn(E, 2 * I, r, scale=0.5)
    wa2, wb2 = rn(E, r, I, scale=I**-0.5), rn(E, H, r, scale=0.5)
    b1, b2 = rn(E, 2 * I, scale=0.1).to(dtype), rn(E, H, scale=0.1).to(dtype)
    x = rn(T, H).to(dtype)
    wts, idx = rn(T, E).softmax(-1).topk(k, dim=1)
    sei, ssi, offs = sort_tokens(idx, E)
    dout = rn(T, H).to(dtype)
    _assert_epilogue_invisible(
        monkeypatch, (x, wa1, wb1, wa2, wb2, wts, b1, b2), dout,
        lambda lv: ops.glu_experts(lv[0], W1, W2, k, sei, ssi, offs, (lv[1], lv[2], 2.0), (lv[3], lv[4], 0.5), lv[5],
                                   b1=lv[6], b2=lv[7], clamp=(ALPHA, LIMIT)),
    )
