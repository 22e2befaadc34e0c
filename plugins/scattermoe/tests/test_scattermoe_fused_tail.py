"""The fused experts tail (SiLU-GLU → down projection → combine, one-launch backward) against the float64
torch reference: output and the gradients of h, the LoRA factors and the routing weights, fused and
split LoRA, no LoRA, experts without tokens, odd sizes, top_k 1/2/8, fp32 and fp16 (interpreter on CPU,
native on CUDA)."""

import pytest
import torch

from host_plugin_scattermoe import fused, reference
from host_plugin_scattermoe import kernels as K
from host_plugin_scattermoe.routing import sort_tokens
from host_plugin_scattermoe.testing import DEV, TOL, TRITON_RUNS, rel

pytestmark = pytest.mark.skipif(not TRITON_RUNS, reason="Triton needs CUDA or TRITON_INTERPRET=1")


def ref_tail(h, W, k, sei, ssi, offs, A, B, s, gates):
    act = reference.glu(h)
    y = reference.scattered_linear(act, W, 1, sei, ssi, offs, A, B, s, None, True, False)
    return reference.combine(y, gates)


# (T, E, I, H, top_k, rank, lora): E=5/7 not powers of two, I/H odd, expert 1 gets no token
CASES = [
    (9, 5, 19, 33, 1, 4, "fused"),
    (11, 7, 27, 40, 2, 8, "fused"),
    (6, 11, 33, 19, 8, 16, "split"),
    (13, 6, 24, 35, 2, 0, "none"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T%d-E%d-I%d-H%d-k%d-r%d-%s" % c)
def test_glu_down_combine_matches_reference(dtype, case):
    T, E, I, H, k, r, mode = case
    g = torch.Generator().manual_seed(T)
    allowed = torch.tensor([e for e in range(E) if e != 1])
    idx = allowed[torch.rand(T, allowed.numel(), generator=g).topk(k, dim=1).indices].to(DEV)
    sei, ssi, offs = sort_tokens(idx, E)
    L = T * k
    h = (torch.randn(L, 2 * I, generator=g) * 2).to(DEV, dtype)
    W = (torch.randn(E, I, H, generator=g) * I**-0.5).to(DEV, dtype)
    A = (torch.randn(E, r, I, generator=g) * I**-0.5).to(DEV, dtype) if r else None
    B = (torch.randn(E, H, r, generator=g) * 0.5).to(DEV, dtype) if r else None
    gates = torch.rand(T, k, generator=g).to(DEV)  # fp32, as routers hand them
    dout = torch.randn(T, H, generator=g).to(DEV, dtype)
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (h, A, B, gates)]
    out = fused.glu_down_combine(
        leaves[0], W, k, sei, ssi, offs, leaves[1], leaves[2], 0.7, leaves[3], fused_lora=mode != "split", backend="triton"
    )
    out.backward(dout)
    d = torch.float64
    refs = [t.detach().to(d).requires_grad_(True) if t is not None else None for t in (h, A, B, gates)]
    want = ref_tail(refs[0], W.to(d), k, sei, ssi, offs, refs[1], refs[2], 0.7, refs[3])
    want.backward(dout.to(d))
    assert out.dtype == dtype and out.shape == (T, H)
    assert rel(out, want) < TOL[dtype]
    names = ["dh", "dA", "dB", "dgates"]
    for name, got, ref in zip(names, leaves, refs):
        if got is None:
            continue
        assert rel(got.grad, ref.grad) < TOL[dtype], name
    assert leaves[3].grad.dtype == torch.float32  # the router's gradient stays fp32
    if r:
        assert leaves[1].grad[1].abs().max() == 0 and leaves[2].grad[1].abs().max() == 0  # expert without tokens


def test_glu_down_dx_multi_tile(monkeypatch):
    """Several column blocks (the routing-weight gradient is a sum of per-block partials), M blocks per expert."""
    if K.INTERPRET:
        monkeypatch.setattr(K, "INTERP_S2S", {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 3})
        monkeypatch.setattr(K, "INTERP_OUTER", {"BLOCK_M": 16, "BLOCK_P": 16, "BLOCK_Q": 16})
    T, E, I, H, k, r = 40, 3, 45, 70, 2, 8
    g = torch.Generator().manual_seed(5)
    idx = torch.rand(T, E, generator=g).topk(k, dim=1).indices.to(DEV)
    sei, ssi, offs = sort_tokens(idx, E)
    h = torch.randn(T * k, 2 * I, generator=g).to(DEV)
    W = (torch.randn(E, I, H, generator=g) * I**-0.5).to(DEV)
    A = (torch.randn(E, r, I, generator=g) * I**-0.5).to(DEV)
    B = torch.randn(E, H, r, generator=g).to(DEV)
    gates = torch.rand(T, k, generator=g).to(DEV)
    dout = torch.randn(T, H, generator=g).to(DEV)
    leaves = [t.clone().requires_grad_(True) for t in (h, A, B, gates)]
    fused.glu_down_combine(leaves[0], W, k, sei, ssi, offs, leaves[1], leaves[2], 0.5, leaves[3], backend="triton").backward(dout)
    refs = [t.double().requires_grad_(True) for t in (h, A, B, gates)]
    ref_tail(refs[0], W.double(), k, sei, ssi, offs, refs[1], refs[2], 0.5, refs[3]).backward(dout.double())
    for name, got, ref in zip(["dh", "dA", "dB", "dgates"], leaves, refs):
        assert rel(got.grad, ref.grad) < 1e-4, name
