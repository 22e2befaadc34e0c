"""Every Triton kernel against the float64 torch reference (interpreter on CPU, native on CUDA).

Covers forward (fused and split LoRA, all grouped_in/grouped_out layouts, bias), dX, dA, dB, dW,
combine, experts without tokens, E not a power of two, odd H/I, top_k 1/2/8, rank 1/8/16/64, fp32
and fp16 (the interpreter's bf16 arithmetic is unreliable, bf16 runs in the GPU tests), the int64
index variant, the routing tensors and the autotune pruning.
"""

import pytest
import torch

from host_plugin_scattermoe import kernels as K
from host_plugin_scattermoe import ops, reference
from host_plugin_scattermoe.routing import sort_tokens
from host_plugin_scattermoe.testing import DEV, TOL, TRITON_RUNS, record_tma_descriptors, rel

pytestmark = pytest.mark.skipif(not TRITON_RUNS, reason="Triton needs CUDA or TRITON_INTERPRET=1")


def routing(T, E, k, seed=0, empty=(1,)):
    """Random top-k routing over E experts that never picks the experts in ``empty``."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(E) if e not in empty])
    scores = torch.rand(T, allowed.numel(), generator=g)
    idx = allowed[scores.topk(k, dim=1).indices]
    return idx.to(DEV)


def make(T, E, Kd, N, k, r, dtype, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEV, dtype)

    x = rnd(T, Kd)
    W = rnd(E, Kd, N, scale=Kd**-0.5)
    A = rnd(E, r, Kd, scale=Kd**-0.5)
    B = rnd(E, N, r, scale=r**-0.5)
    b = rnd(E, N, scale=0.1) if bias else None
    return x, W, A, B, b


# (T, E, K, N, top_k, rank): E=5/7/6 are not powers of two, K/N odd, experts 1 (and more) get no tokens.
CASES = [
    (9, 5, 33, 19, 1, 1),
    (11, 7, 40, 27, 2, 8),
    (6, 11, 19, 33, 8, 16),
    (13, 6, 35, 24, 2, 64),
]
LAYOUTS = [(False, True), (True, False), (False, False), (True, True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T%d-E%d-K%d-N%d-k%d-r%d" % c)
@pytest.mark.parametrize("split", [False, True], ids=["fused", "split"])
def test_forward_matches_reference(dtype, case, split):
    T, E, Kd, N, k, r = case
    x, W, A, B, b = make(T, E, Kd, N, k, r, dtype, bias=True)
    sei, ssi, offs = sort_tokens(routing(T, E, k), E)
    layouts = LAYOUTS if case is CASES[1] else LAYOUTS[:2]
    for gin, gout in layouts:
        xin = x if not gin else x[ssi // k]  # grouped input = rows already in sorted order
        fan = 1 if gin else k
        if split:
            xa = K.rank_xa(xin, A, ssi, offs, fan, gin)
            y, _ = K.scatter2scatter(xin, W, ssi, offs, fan, B=B, xa_in=xa, scaling=0.7, bias=b, grouped_in=gin, grouped_out=gout)
        else:
            y, xa = K.scatter2scatter(
                xin, W, ssi, offs, fan, A=A, B=B, scaling=0.7, bias=b, grouped_in=gin, grouped_out=gout, write_xa=True
            )
        d = torch.float64
        y_ref = reference.scattered_linear(
            xin.to(d), W.to(d), fan, sei, ssi, offs, A.to(d), B.to(d), 0.7, b.to(d), gin, gout
        )
        assert y.dtype == dtype and y.shape == (T * k, N)
        assert rel(y, y_ref) < TOL[dtype], (gin, gout, rel(y, y_ref))
        xs = xin.to(d) if gin else xin.to(d)[ssi // k]
        xa_ref = torch.einsum("lk,lrk->lr", xs, A.to(d)[sei])
        assert rel(xa, xa_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T%d-E%d-K%d-N%d-k%d-r%d" % c)
@pytest.mark.parametrize(
    "split,layout", [(False, (False, True)), (False, (True, False)), (True, (False, True)), (True, (True, False))],
    ids=["fused-up", "fused-down", "split-up", "split-down"],
)
def test_backward_dx_da_db_match_reference(dtype, case, split, layout):
    T, E, Kd, N, k, r = case
    gin, gout = layout
    x, W, A, B, _ = make(T, E, Kd, N, k, r, dtype, seed=1)
    sei, ssi, offs = sort_tokens(routing(T, E, k, seed=1), E)
    if gin:
        x = x[ssi // k].contiguous()
    fan = 1 if gin else k
    g = torch.Generator().manual_seed(7)
    dy = torch.randn(T * k, N, generator=g).to(DEV, dtype)

    xs, As, Bs = (t.detach().clone().requires_grad_(True) for t in (x, A, B))
    y = ops.scattered_experts(
        xs, W, fan, sei, ssi, offs, As, Bs, 0.5, None, gin, gout, fused_lora=not split, backend="triton"
    )
    y.backward(dy)
    d = torch.float64
    xr, Ar, Br = (t.detach().to(d).requires_grad_(True) for t in (x, A, B))
    yr = reference.scattered_linear(xr, W.to(d), fan, sei, ssi, offs, Ar, Br, 0.5, None, gin, gout)
    yr.backward(dy.to(d))
    assert rel(y, yr) < TOL[dtype]
    assert rel(xs.grad, xr.grad) < TOL[dtype], "dX"
    assert rel(As.grad, Ar.grad) < TOL[dtype], "dA"
    assert rel(Bs.grad, Br.grad) < TOL[dtype], "dB"
    # experts that received no token get exactly zero LoRA gradient
    assert As.grad[1].abs().max() == 0 and Bs.grad[1].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_full_finetune_dw_and_bias(dtype):
    T, E, Kd, N, k, r = 10, 6, 37, 21, 2, 8
    x, W, A, B, b = make(T, E, Kd, N, k, r, dtype, seed=2, bias=True)
    sei, ssi, offs = sort_tokens(routing(T, E, k, seed=2), E)
    dy = torch.randn(T * k, N, generator=torch.Generator().manual_seed(3)).to(DEV, dtype)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, W, b)]
    y = ops.scattered_experts(leaves[0], leaves[1], k, sei, ssi, offs, bias=leaves[2], grouped_out=True, backend="triton")
    y.backward(dy)
    d = torch.float64
    refs = [t.detach().to(d).requires_grad_(True) for t in (x, W, b)]
    reference.scattered_linear(refs[0], refs[1], k, sei, ssi, offs, bias=refs[2], grouped_out=True).backward(dy.to(d))
    for name, got, want in zip(["dX", "dW", "dbias"], leaves, refs):
        assert rel(got.grad, want.grad) < TOL[dtype], name
    assert leaves[1].grad[1].abs().max() == 0  # expert without tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("N", [45, 150])
def test_combine_forward_backward(dtype, k, N):
    T = 7
    g = torch.Generator().manual_seed(k)
    y = torch.randn(T * k, N, generator=g).to(DEV, dtype).requires_grad_(True)
    gates = torch.rand(T, k, generator=g).to(DEV, dtype).requires_grad_(True)
    out = ops.combine(y, gates, backend="triton")
    dout = torch.randn(T, N, generator=g).to(DEV, dtype)
    out.backward(dout)
    yr, gr = y.detach().double().requires_grad_(True), gates.detach().double().requires_grad_(True)
    ref = reference.combine(yr, gr)
    ref.backward(dout.double())
    assert rel(out, ref) < TOL[dtype]
    assert rel(y.grad, yr.grad) < TOL[dtype] and rel(gates.grad, gr.grad) < TOL[dtype]


def test_combine_fp32_gates_with_half_outputs():
    """Routers hand fp32 weights: the gate gradient stays fp32 (accumulated in fp32), not rounded to fp16."""
    T, k, N = 5, 4, 300
    g = torch.Generator().manual_seed(3)
    y = torch.randn(T * k, N, generator=g).to(DEV, torch.float16).requires_grad_(True)
    gates = torch.rand(T, k, generator=g).to(DEV).requires_grad_(True)
    out = ops.combine(y, gates, backend="triton")
    assert out.dtype == torch.float16
    dout = torch.randn(T, N, generator=g).to(DEV, torch.float16)
    out.backward(dout)
    assert gates.grad.dtype == torch.float32
    want = (y.detach().double().view(T, k, N) * dout.double().unsqueeze(1)).sum(-1)
    assert rel(gates.grad, want) < 1e-6  # fp16 rounding of dg would be ~1e-4


def test_group_outer_gathers_and_zero_experts():
    T, E, k, P, Q = 12, 5, 2, 17, 23
    sei, ssi, offs = sort_tokens(routing(T, E, k, seed=4, empty=(0, 3)), E)
    g = torch.Generator().manual_seed(5)
    Lm = torch.randn(T, P, generator=g).to(DEV)  # gathered through ssi // k
    Rm = torch.randn(T * k, Q, generator=g).to(DEV)  # grouped
    out = K.group_outer(Lm, Rm, ssi, offs, l_fan=k, r_fan=0, scaling=2.0)
    want = torch.zeros(E, P, Q, dtype=torch.float64, device=DEV)
    Lg = Lm.double()[ssi // k]
    for p in range(T * k):
        want[sei[p]] += 2.0 * torch.outer(Lg[p], Rm.double()[p])
    assert rel(out, want) < 1e-5
    assert out[0].abs().max() == 0 and out[3].abs().max() == 0


def test_multi_tile_loops(monkeypatch):
    """Several K-loop steps, N tiles, M blocks per expert and rank tiles: small tiles, larger problem."""
    if K.INTERPRET:
        monkeypatch.setattr(K, "INTERP_S2S", {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 3})
        monkeypatch.setattr(K, "INTERP_OUTER", {"BLOCK_M": 16, "BLOCK_P": 16, "BLOCK_Q": 16})
    T, E, Kd, N, k, r = 40, 3, 70, 45, 2, 8
    x, W, A, B, _ = make(T, E, Kd, N, k, r, torch.float32, seed=8)
    sei, ssi, offs = sort_tokens(routing(T, E, k, seed=8, empty=()), E)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, A, B)]
    y = ops.scattered_experts(leaves[0], W, k, sei, ssi, offs, leaves[1], leaves[2], 0.5, grouped_out=True, backend="triton")
    dy = torch.randn_like(y)
    y.backward(dy)
    refs = [t.detach().double().requires_grad_(True) for t in (x, A, B)]
    yr = reference.scattered_linear(refs[0], W.double(), k, sei, ssi, offs, refs[1], refs[2], 0.5, grouped_out=True)
    yr.backward(dy.double())
    assert rel(y, yr) < 1e-4
    for got, want in zip(leaves, refs):
        assert rel(got.grad, want.grad) < 1e-4


def _check_layout_against_reference(x, W, A, B, bias, sei, ssi, offs, k, gin, gout, split, dtype, g):
    """One projection layout through the Triton path (LoRA scaling 0.5, fused or split), forward and backward,
    against the float64 reference: output, dX, dA and dB within ``TOL[dtype]``. ``g`` draws the output gradient."""
    d = torch.float64
    xin = x[ssi // k].contiguous() if gin else x
    fan = 1 if gin else k
    dy = torch.randn(ssi.numel(), W.shape[2], generator=g).to(DEV, dtype)
    leaves = [t.detach().clone().requires_grad_(True) for t in (xin, A, B)]
    y = ops.scattered_experts(
        leaves[0], W, fan, sei, ssi, offs, leaves[1], leaves[2], 0.5, bias, gin, gout, fused_lora=not split,
        backend="triton",
    )
    y.backward(dy)
    refs = [t.detach().to(d).requires_grad_(True) for t in (xin, A, B)]
    yr = reference.scattered_linear(refs[0], W.to(d), fan, sei, ssi, offs, refs[1], refs[2], 0.5,
                                    None if bias is None else bias.to(d), gin, gout)
    yr.backward(dy.to(d))
    assert rel(y, yr) < TOL[dtype], (gin, gout, split)
    for name, got, want in zip(["dX", "dA", "dB"], leaves, refs):
        assert rel(got.grad, want.grad) < TOL[dtype], (name, gin, gout, split)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("w_layout", ["stored [N, K]", "stored [K, N]"])
def test_tma_descriptor_path_matches_reference(monkeypatch, dtype, w_layout):
    """TMA descriptors for W (both storage layouts) and grouped x, forward and backward (dX uses the
    transposed W, the other descriptor layout), fused and split LoRA, K and N not multiples of the tile:
    a box past an expert's rows or past K must not leak into the result."""
    taken = record_tma_descriptors(monkeypatch)
    T, E, Kd, N, k, r = 24, 5, 72, 40, 2, 8
    x, W, A, B, _ = make(T, E, Kd, N, k, r, dtype, seed=11)
    if w_layout == "stored [N, K]":
        W = W.transpose(1, 2).contiguous().transpose(1, 2)
    sei, ssi, offs = sort_tokens(routing(T, E, k, seed=11), E)
    g = torch.Generator().manual_seed(3)
    for gin, gout, split in [(False, True, False), (True, False, False), (True, False, True)]:
        _check_layout_against_reference(x, W, A, B, None, sei, ssi, offs, k, gin, gout, split, dtype, g)
    assert {t[0] for t in taken} == {1, 2}, "both W descriptor layouts (forward and dX) were used"
    assert any(t[2] for t in taken), "grouped x went through a descriptor"


@pytest.mark.parametrize(
    "mode,tma,dtype",
    [(m, t, torch.float32) for m in ("persistent", "half_tail", "persistent+half_tail") for t in (False, True)]
    + [("persistent+half_tail", True, torch.float16), ("persistent+noflat+half_tail", True, torch.float32)],
    ids=lambda v: {False: "ptr", True: "tma"}.get(v, str(v).replace("torch.", "")) if not isinstance(v, str) else v,
)
def test_persistent_grid_and_half_tail_match_reference(monkeypatch, dtype, tma, mode):
    """The persistent launch (fewer programs than tiles, each walking tiles with the grid's stride, row blocks counted
    on the device) and the half-height tile for an expert's last row block (``HALF_TAIL``): forward and backward, all
    four grouped layouts, fused and split LoRA, bias, several row blocks per expert (full, more than half and at most
    half a tile in the last one), idle experts, K and N not multiples of the tile, pointer loads or TMA descriptors."""
    persistent = []
    flags = {"PERSISTENT": "persistent" in mode, "HALF_TAIL": "half_tail" in mode}
    if "noflat" in mode:
        flags["FLATTEN"] = False
    if K.INTERPRET:
        monkeypatch.setattr(K, "INTERP_S2S", {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 3, **flags})
    else:
        monkeypatch.setattr(K, "FORCE", {"s2s": {**K._cfg(64, 64, 32, 3, 4, 3), **flags}})
    monkeypatch.setattr(K, "TMA_MODE", "1" if tma else "0")
    real = K._s2s_plan
    monkeypatch.setattr(K, "_s2s_plan", lambda *a: persistent.append(real(*a)) or persistent[-1])
    # 3 programs on the GPU too (there the grid is one per SM, more than this problem has tiles): each walks several
    monkeypatch.setattr(K, "num_programs_persistent", lambda x: 3)
    T, E, Kd, N, k, r = 37, 5, 72, 40, 2, 8
    x, W, A, B, b = make(T, E, Kd, N, k, r, dtype, seed=13, bias=True)
    sei, ssi, offs = sort_tokens(routing(T, E, k, seed=12), E)  # rows per expert 23, 0, 20, 11, 20
    g = torch.Generator().manual_seed(5)
    for (gin, gout), split in zip(LAYOUTS, (False, True, True, False)):
        _check_layout_against_reference(x, W, A, B, b, sei, ssi, offs, k, gin, gout, split, dtype, g)
    plans = [p for p in persistent if p[1]["BLOCK_N"] >= 32]
    assert plans and all(p[1].get("HALF_TAIL", False) == flags["HALF_TAIL"] for p in plans)
    assert all(p[3] == tma for p in plans)
    if flags["PERSISTENT"]:
        assert all(p[1].get("PERSISTENT") and p[2][0] <= 3 for p in plans), "the persistent launches ran on 3 programs"
    counts = torch.bincount(sei, minlength=E).tolist()
    assert {c % 16 for c in counts} & set(range(1, 9)) and {c % 16 for c in counts} & set(range(9, 16)), counts


def test_warp_specialised_tile_is_off_where_it_hung(monkeypatch):
    """On a GPU the tile needs 16-bit operands and a Triton newer than 3.9: under 3.6 every launch hung on an H100 and
    3.9's pass rejects it for sm_90a, so there ``SCATTERMOE_WS`` must leave every launch on the plain tile."""
    monkeypatch.setattr(K, "INTERPRET", False)
    bf16, fp32 = torch.empty(1, dtype=torch.bfloat16), torch.empty(1)
    plain = K.s2s_rule(32768, 128, 2048, 768, 2, grouped_in=True, tma=True)
    monkeypatch.setattr(K, "WS_MODE", "1")
    for version in ((3, 6), (3, 9)):
        monkeypatch.setattr(K, "_TRITON_VERSION", version)
        assert not K._ws_runs(bf16)
        # the rule's tiles too: no warp-specialised candidate (which the launch would run as a plain 3-stage tile)
        assert K.s2s_rule(32768, 128, 2048, 768, 2, grouped_in=True, tma=True) == plain
    monkeypatch.setattr(K, "_TRITON_VERSION", (3, 10))
    assert K._ws_runs(bf16) and not K._ws_runs(fp32)
    assert K.s2s_rule(32768, 128, 2048, 768, 2, grouped_in=True, tma=True)[0].get("WS")


@pytest.mark.parametrize("dtype,mode", [(torch.float32, "1"), (torch.float16, "1"), (torch.float32, "2")],
                         ids=["fp32", "fp16", "fp32-gathered"])
def test_warp_specialised_tile_matches_reference(monkeypatch, dtype, mode):
    """The warp-specialised tile (``WS``; on the GPU Triton's Hopper pass, here its numerics): the grouped-input
    launches (both operands through TMA) find their row block without ``tl.cumsum`` (64 experts at a time: E = 70 spans
    two chunks), programs past the last row block run no K step, fused LoRA becomes the split epilogue with xa and B
    read through descriptors; forward and backward of all four layouts, idle experts, K and N not multiples of the
    tile, against the float64 reference. Launches that cannot take it (gathered input) run the plain tile, or with
    ``SCATTERMOE_WS=2`` gather their rows into sorted order first and take it too."""
    if not K.INTERPRET and not K._ws_pass_runs():
        pytest.skip("no Triton up to 3.9 runs this tile on sm_90 (kernels._ws_pass_runs); bench/probe_ws.py probes it")
    monkeypatch.setattr(K, "WS_MODE", mode)
    tile = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 3, "TMA": True, "WS": True}
    if K.INTERPRET:
        monkeypatch.setattr(K, "INTERP_S2S", tile)
    else:
        # the GPU's warp groups split the tile's rows in two 64-row wgmma halves
        gpu_tile = {**tile, "BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
        monkeypatch.setattr(K, "FORCE", {"s2s": gpu_tile})
    monkeypatch.setattr(K, "TMA_MODE", "1")
    used = []
    real = K._ws_kwargs
    monkeypatch.setattr(K, "_ws_kwargs", lambda kw, ws: used.append(ws) or real(kw, ws))
    T, E, Kd, N, k, r = 41, 70, 72, 40, 2, 8
    x, W, A, B, b = make(T, E, Kd, N, k, r, dtype, seed=21, bias=True)
    B = B.transpose(1, 2).contiguous().transpose(1, 2)  # N contiguous, as the re-laid-out factors (relayout.py)
    sei, ssi, offs = sort_tokens(routing(T, E, k, seed=22, empty=(1, 64)), E)
    g = torch.Generator().manual_seed(23)
    for (gin, gout), split in zip(LAYOUTS, (False, True, True, False)):
        _check_layout_against_reference(x, W, A, B, b, sei, ssi, offs, k, gin, gout, split, dtype, g)
    if dtype == torch.float32 and not K.INTERPRET:  # Triton 3.6 compiles the tile for 16-bit operands only
        assert True not in used, used
    else:
        assert True in used and (False in used) == (mode == "1"), used
    assert torch.bincount(sei, minlength=E)[64:].sum() > 0  # rows in the second chunk of 64 experts


def test_int64_variant_is_bitwise_identical(monkeypatch):
    """Force the 64-bit index specialisation on a small problem: same numbers as int32."""
    T, E, Kd, N, k, r = 8, 5, 24, 20, 2, 8
    x, W, A, B, _ = make(T, E, Kd, N, k, r, torch.float32, seed=6)
    sei, ssi, offs = sort_tokens(routing(T, E, k, seed=6), E)
    y32, xa32 = K.scatter2scatter(x, W, ssi, offs, k, A=A, B=B, scaling=0.5, grouped_out=False, write_xa=True)
    o32 = K.group_outer(x, xa32, ssi, offs, l_fan=k)
    monkeypatch.setattr(K, "needs_int64", lambda *t: True)
    y64, xa64 = K.scatter2scatter(x, W, ssi, offs, k, A=A, B=B, scaling=0.5, grouped_out=False, write_xa=True)
    o64 = K.group_outer(x, xa64, ssi, offs, l_fan=k)
    assert torch.equal(y32, y64) and torch.equal(xa32, xa64) and torch.equal(o32, o64)


def test_needs_int64_threshold():
    small = torch.empty(2**20, dtype=torch.uint8)
    assert not K.needs_int64(small)
    big = torch.empty(0).expand(0)  # empty never needs it
    assert not K.needs_int64(big)

    class View:  # a strided view whose last element sits past 2**31 needs it even with few elements
        shape = (2, 2)

        def numel(self):
            return 4

        def stride(self):
            return (2**31, 1)

    assert K.needs_int64(View())


def test_sort_tokens_contract():
    idx = torch.tensor([[2, 0], [2, 4], [0, 2]])
    sei, ssi, offs = sort_tokens(idx, 6)
    assert sei.tolist() == [0, 0, 2, 2, 2, 4]
    assert ssi.tolist() == [1, 4, 0, 2, 5, 3]  # stable: token order kept within an expert
    assert offs.tolist() == [2, 2, 5, 5, 6, 6]  # cumulative end offsets, length E
    assert torch.equal(idx.reshape(-1)[ssi], sei)


def test_m_bucket_and_pruning(monkeypatch):
    assert K.m_bucket(1) == 256 and K.m_bucket(4000) == 4096 and K.m_bucket(4096) == 4096 and K.m_bucket(4097) == 8192
    import triton

    monkeypatch.setattr(K, "device_limits", lambda index=None: {"smem": 100 * 1024, "regs": 65536})
    cfgs = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=2),  # SMEM of a big GPU
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 32}, num_warps=4, num_stages=2),  # too many regs
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    ]
    x = torch.empty(1, 1, dtype=torch.bfloat16)
    kept = K._prune_s2s(cfgs, {"X": x, "N": 4096, "LORA": 1, "BLOCK_R": 16})
    assert kept == [cfgs[2]]
    monkeypatch.setattr(K, "device_limits", lambda index=None: {"smem": 228 * 1024, "regs": 65536})
    kept = K._prune_s2s(cfgs, {"X": x, "N": 4096, "LORA": 1, "BLOCK_R": 16})
    assert cfgs[0] in kept and cfgs[1] not in kept
    # never wider than the output
    assert K._prune_s2s(cfgs, {"X": x, "N": 64, "LORA": 0, "BLOCK_R": 16}) == [cfgs[2]]


def test_tile_rule_tma_choice(monkeypatch):
    """TMA tiles only where the rule was measured faster (>= 160 rows per expert, not the rank GEMMs or the GLU
    epilogue) and only on a TMA-capable device; the pick fits an H200's shared memory and is the same every time."""
    new = K.s2s_rule(32768, 128, 2048, 1536, 1, tma=True)[0]
    assert new["TMA"] and (new["BLOCK_M"], new["BLOCK_N"], new["num_stages"]) == (128, 256, 4)
    assert not any(c.get("TMA") for c in K.s2s_rule(32768, 256, 2048, 1024, 1, tma=True))  # 128 rows per expert
    assert not any(c.get("TMA") for c in K.s2s_rule(32768, 128, 2048, 1536, 1, tma=False))
    assert not any(c.get("TMA") for c in K.s2s_rule(4096, 128, 2048, 1536, 1, tma=True))  # 32 rows per expert
    assert not any(c.get("TMA") for c in K.s2s_rule(32768, 128, 2048, 16, 0, tma=True))  # rank-sized output
    assert not any(c.get("TMA") for c in K.s2s_rule(32768, 128, 768, 2048, 1, glu=True, tma=True))
    monkeypatch.setattr(K, "device_limits", lambda index=None: {"smem": 232448, "regs": 65536})
    monkeypatch.setattr(K, "_PICKED", {})
    x = torch.empty(1, 1, dtype=torch.bfloat16)
    args = {"X": x, "N": 1536, "LORA": 1, "BLOCK_R": 16}
    rule = K.s2s_rule(32768, 128, 2048, 1536, 1, tma=True)
    assert K.pick_tiles("s2s", ("k",), rule, args) == new == K.pick_tiles("s2s", ("k",), rule, args)
    monkeypatch.setattr(K, "TMA_MODE", "0")
    assert not K.use_tma(True, x)


def test_tile_rule_persistent_and_half_tail_modes(monkeypatch):
    """SCATTERMOE_PERSISTENT=1 puts a persistent TMA tile (3 stages: 4 would not fit beside the next tile's buffers)
    first wherever the rule takes TMA; SCATTERMOE_HALF_TAIL=1 marks every 128-row candidate; =0 turns each off."""
    monkeypatch.setattr(K, "PERSISTENT_MODE", "1")
    monkeypatch.setattr(K, "HALF_TAIL_MODE", "0")
    first = K.s2s_rule(32768, 128, 2048, 1536, 1, tma=True)[0]
    assert first["PERSISTENT"] and first["TMA"] and first["num_stages"] == 3
    assert not any(c.get("PERSISTENT") for c in K.s2s_rule(32768, 128, 2048, 1536, 1, tma=False))
    monkeypatch.setattr(K, "PERSISTENT_MODE", "noflat")  # the tile loop not flattened: 4 stages fit
    first = K.s2s_rule(32768, 128, 2048, 1536, 1, tma=True)[0]
    assert first["PERSISTENT"] and not first["FLATTEN"] and first["num_stages"] == 4
    monkeypatch.setattr(K, "PERSISTENT_MODE", "0")
    monkeypatch.setattr(K, "HALF_TAIL_MODE", "1")
    cands = K.s2s_rule(32768, 128, 2048, 1536, 1, tma=True)
    assert not any(c.get("PERSISTENT") for c in cands)
    assert all(c.get("HALF_TAIL", False) == (c["BLOCK_M"] == 128) for c in cands)
    monkeypatch.setattr(K, "HALF_TAIL_MODE", "0")
    assert not any(c.get("HALF_TAIL") for c in K.s2s_rule(32768, 128, 2048, 1536, 1, tma=True))
    # the default rule: half tails below 768 rows per expert (Qwen3-30B-A3B: 256), not at Mixtral's 1024; never persistent
    monkeypatch.setattr(K, "HALF_TAIL_MODE", "rule")
    monkeypatch.setattr(K, "PERSISTENT_MODE", "rule")
    q3 = K.s2s_rule(32768, 128, 2048, 1536, 1, tma=True)
    assert q3[0]["HALF_TAIL"] and q3[0]["TMA"] and not any(c.get("PERSISTENT") for c in q3)
    assert not any(c.get("HALF_TAIL") for c in K.s2s_rule(8192, 8, 4096, 28672, 2, tma=True))


def test_split_dispatch_threshold():
    assert ops.use_split(8, 4096, 28672)  # Mixtral gate_up: few, large experts
    assert not ops.use_split(128, 2048, 1536)  # Qwen3-30B-A3B: many small experts
    assert ops.use_split(128, 2048, 1536, fused_lora=False)
    assert not ops.use_split(8, 4096, 28672, split_threshold=10**12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_glu_forward_backward(dtype):
    g = torch.Generator().manual_seed(9)
    h = torch.randn(23, 2 * 37, generator=g).to(DEV, dtype).requires_grad_(True)
    out = ops.silu_glu(h, backend="triton")
    dout = torch.randn(23, 37, generator=g).to(DEV, dtype)
    out.backward(dout)
    hr = h.detach().double().requires_grad_(True)
    ref = reference.glu(hr)
    ref.backward(dout.double())
    assert rel(out, ref) < TOL[dtype] and rel(h.grad, hr.grad) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_clamped_glu_forward_backward(dtype):
    """gpt-oss's interleaved clamped sigmoid-GLU: values on both sides of ±limit (clamped gradients are 0)."""
    g = torch.Generator().manual_seed(10)
    h = (torch.randn(19, 2 * 41, generator=g) * 6).to(DEV, dtype).requires_grad_(True)
    out = ops.clamped_glu(h, 1.702, 7.0, backend="triton")
    dout = torch.randn(19, 41, generator=g).to(DEV, dtype)
    out.backward(dout)
    hr = h.detach().double().requires_grad_(True)
    ref = reference.gpt_oss_glu(hr, 1.702, 7.0)
    ref.backward(dout.double())
    assert (hr.detach().abs() > 7).any() and (hr.grad == 0).any()
    assert rel(out, ref) < TOL[dtype] and rel(h.grad, hr.grad) < TOL[dtype]


def test_gate_dispatch_is_checked_numerically():
    """gpt-oss's experts take the fused clamped GLU, Qwen3-MoE's the fused SiLU GLU; a class whose gate
    differs keeps its own code."""
    from host.testing import tiny_config
    from transformers import AutoModelForCausalLM

    from host_plugin_scattermoe import experts

    def experts_of(model_type, **kw):
        m = AutoModelForCausalLM.from_config(tiny_config(model_type, 64, **kw))
        return next(x for x in m.modules() if hasattr(x, "num_experts") and hasattr(x, "down_proj"))

    gpt = experts_of("gpt_oss", num_local_experts=4, intermediate_size=16, layer_types=["sliding_attention", "full_attention"])
    assert experts._is_clamped_glu_gate(gpt)
    plain = type(gpt)
    gpt.__class__ = type("PluginSubclass", (plain,), {})  # as another plugin wraps the module (mxfp4): gate inherited
    assert experts._is_clamped_glu_gate(gpt)
    gpt.__class__ = plain
    qwen = experts_of("qwen3_moe")
    assert experts._is_default_silu_gate(qwen) and not experts._is_clamped_glu_gate(qwen)

    class Unclamped(type(gpt)):
        def _apply_gate(self, gate_up):
            gate, up = gate_up[..., ::2], gate_up[..., 1::2]
            return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    gpt.__class__ = Unclamped
    assert not experts._is_clamped_glu_gate(gpt)
    h = torch.randn(3, 32) * 10
    torch.testing.assert_close(experts.apply_gate(gpt, h), gpt._apply_gate(h))
