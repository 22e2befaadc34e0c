"""GPU only: bf16 kernels at real model shapes against an fp32 reference, and the int64 index path on a
buffer past 2**31 elements (the last rows must be written). Skipped without CUDA."""

import pytest
import torch

from host_plugin_scattermoe import kernels as K
from host_plugin_scattermoe import ops, reference
from host_plugin_scattermoe.routing import sort_tokens

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or K.INTERPRET, reason="needs CUDA (not the interpreter)")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


# (name, E, K, N, T, top_k, layout up/down, bias)
SHAPES = [
    ("qwen3-30b-a3b up", 128, 2048, 1536, 2048, 8, "up", False),
    ("qwen3-30b-a3b down", 128, 768, 2048, 2048, 8, "down", False),
    ("qwen3.5-35b-a3b up", 256, 2048, 1024, 1024, 8, "up", False),
    ("mixtral up (split)", 8, 4096, 28672, 1024, 2, "up", False),
    ("mixtral down (split)", 8, 14336, 4096, 1024, 2, "down", False),
    ("gpt-oss-20b up +bias", 32, 2880, 5760, 2048, 4, "up", True),
]


@pytest.mark.parametrize(
    "tma", ["0", "1", "persistent", "half-tail", "persistent+half-tail"],
    ids=["pointer-loads", "tma", "persistent-tma", "half-tail-tma", "persistent-half-tail-tma"],
)
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_bf16_real_shapes_fwd_bwd(shape, tma, monkeypatch):
    """Every launch of one projection, forward and backward; ``tma``: TMA descriptors wherever the layout
    allows (W always, x when grouped), else pointer loads everywhere; ``persistent`` / ``half-tail``: every launch
    on the persistent grid / with half-height tiles for short last row blocks, TMA tile 128x256x64."""
    if tma in ("persistent", "half-tail", "persistent+half-tail"):
        if "split" in shape[0]:
            pytest.skip("the forced 128x256 tile would also run the split path's rank-r launch, which it does not fit")
        flags = {"PERSISTENT": "persistent" in tma, "HALF_TAIL": "half-tail" in tma}
        stages = 3 if flags["PERSISTENT"] else 4  # as the rule's tiles (4 stages do not fit a persistent program)
        monkeypatch.setattr(K, "FORCE", {"s2s": {**K._cfg(128, 256, 64, 8, 8, stages), "TMA": True, **flags}})
        tma = "rule"
    monkeypatch.setattr(K, "TMA_MODE", tma)
    name, E, Kd, N, T, k, layout, has_bias = shape
    r, s = 16, 2.0
    g = torch.Generator(device="cuda").manual_seed(0)
    dt = torch.bfloat16
    gin, gout = (False, True) if layout == "up" else (True, False)
    rows = T if not gin else T * k
    x = (torch.randn(rows, Kd, device="cuda", generator=g)).to(dt)
    W = (torch.randn(E, N, Kd, device="cuda", generator=g) * Kd**-0.5).to(dt).transpose(1, 2)  # transformers layout
    A = (torch.randn(E, r, Kd, device="cuda", generator=g) * Kd**-0.5).to(dt)
    B = (torch.randn(E, N, r, device="cuda", generator=g) * 0.3).to(dt)
    b = (torch.randn(E, N, device="cuda", generator=g) * 0.1).to(dt) if has_bias else None
    logits = torch.randn(T, E, device="cuda", generator=g)
    sei, ssi, offs = sort_tokens(logits.topk(k, dim=1).indices, E)
    fan = 1 if gin else k
    dy = torch.randn(T * k, N, device="cuda", generator=g).to(dt)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, A, B)]
    y = ops.scattered_experts(leaves[0], W, fan, sei, ssi, offs, leaves[1], leaves[2], s, b, gin, gout)
    y.backward(dy)
    refs = [t.detach().float().requires_grad_(True) for t in (x, A, B)]
    yr = reference.scattered_linear(
        refs[0], W.float(), fan, sei, ssi, offs, refs[1], refs[2], s, None if b is None else b.float(), gin, gout
    )
    yr.backward(dy.float())
    errs = {"fwd": rel(y, yr)} | {n: rel(a.grad, w.grad) for n, a, w in zip(["dX", "dA", "dB"], leaves, refs)}
    assert all(v < 2e-2 for v in errs.values()), (name, errs)


def test_int64_indices_past_2_31_elements(monkeypatch):
    """Output of L*N = 2**31 + N*64 elements: rows beyond the int32 range are written correctly."""
    E, Kd, N, k, r = 8, 128, 16384, 8, 16
    T = 2**31 // (N * k) + 8  # 16392 tokens, 131136 routed rows
    free = torch.cuda.mem_get_info()[0]
    if free < 12 * 2**30:
        pytest.skip("needs 12 GiB of free GPU memory")
    g = torch.Generator(device="cuda").manual_seed(1)
    dt = torch.bfloat16
    x = torch.randn(T, Kd, device="cuda", generator=g).to(dt)
    W = (torch.randn(E, Kd, N, device="cuda", generator=g) * Kd**-0.5).to(dt)
    A = (torch.randn(E, r, Kd, device="cuda", generator=g) * Kd**-0.5).to(dt)
    B = (torch.randn(E, N, r, device="cuda", generator=g) * 0.3).to(dt)
    idx = torch.randn(T, E, device="cuda", generator=g).topk(k, dim=1).indices
    sei, ssi, offs = sort_tokens(idx, E)
    seen = []
    real = K.needs_int64
    monkeypatch.setattr(K, "needs_int64", lambda *t: seen.append(real(*t)) or seen[-1])
    for gout in (False, True):
        y, _ = K.scatter2scatter(x, W, ssi, offs, k, A=A, B=B, scaling=2.0, grouped_out=gout)
        assert y.numel() >= 2**31 and seen[-1] is True
        L = T * k
        # rows to check: the last 64 positions of the buffer and a few just past 2**31 // N
        pos = torch.cat([torch.arange(L - 64, L), torch.arange(2**31 // N - 4, 2**31 // N + 4)]).cuda()
        if gout:  # sorted position p holds pair ssi[p]
            sorted_pos = pos
        else:  # flat row f is written by the sorted position p with ssi[p] == f
            inv = torch.empty_like(ssi)
            inv[ssi] = torch.arange(L, device="cuda")
            sorted_pos = inv[pos]
        e = sei[sorted_pos]
        xt = x[ssi[sorted_pos] // k].float()
        want = torch.einsum("pk,pkn->pn", xt, W[e].float()) + 2.0 * torch.einsum(
            "pr,pnr->pn", torch.einsum("pk,prk->pr", xt, A[e].float()), B[e].float()
        )
        got = y[pos].float()
        assert got.abs().sum(1).min() > 0, "rows past 2**31 elements were not written"
        assert rel(got, want) < 2e-2
        del y
        torch.cuda.empty_cache()
