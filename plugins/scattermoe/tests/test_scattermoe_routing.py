"""The Triton routing sort (``routing_kernels``) against the torch path (``routing.sort_tokens_torch``), bit for bit.

Interpreter on CPU (small shapes; both rank variants, every scan variant, the int64 specialisation forced on small
inputs), native on CUDA (the same cases plus real sizes, CUDA-graph capture and no host synchronisation)."""

import os
import subprocess
import sys

import pytest
import torch

from host_plugin_scattermoe import routing
from host_plugin_scattermoe import routing_kernels as RK
from host_plugin_scattermoe.testing import DEV, TRITON_RUNS

pytestmark = pytest.mark.skipif(not TRITON_RUNS, reason="Triton needs CUDA or TRITON_INTERPRET=1")
GPU = DEV == "cuda"


def topk_ids(T, E, k, seed=0, skew=0.0):
    """Top-k routing of T tokens over E experts; ``skew`` > 0 concentrates tokens on the low experts."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    scores = torch.rand(T, E, generator=g, device=DEV) - skew * torch.arange(E, device=DEV) / max(E, 1)
    return scores.topk(k, dim=1).indices


def assert_same(idx, E, **kw):
    want = routing.sort_tokens_torch(idx, E)
    got = RK.route_sort(idx.reshape(-1), E, **kw)
    for name, w, g in zip(("sorted_expert_idxs", "sorted_scattered_idxs", "expert_offsets"), want, got):
        assert g.dtype == w.dtype == torch.int64 and g.shape == w.shape and g.device == w.device, (name, g, w)
        assert torch.equal(g, w), (name, kw, (g != w).nonzero()[:8].flatten().tolist())
    return got


# GPU first (the GPU run is short)
@pytest.mark.skipif(not GPU, reason="GPU only")
@pytest.mark.parametrize("T,k,E", [(4096, 8, 128), (4096, 8, 256), (4096, 8, 64), (32768, 8, 128), (1 << 19, 8, 512),
                                   (3000, 1, 8), (123457, 2, 8)])
def test_gpu_real_sizes(T, k, E):
    idx = topk_ids(T, E, k, seed=T)
    assert_same(idx, E)
    assert_same(idx, E)  # a repeat takes launch.py's direct path
    assert_same(idx, E, scan=2)
    assert_same(topk_ids(T, E, k, seed=1, skew=100.0), E)


@pytest.mark.skipif(not GPU, reason="GPU only")
def test_gpu_no_sync_and_cuda_graph():
    E, T, k = 128, 4096, 8
    idx = topk_ids(T, E, k, seed=1)
    routing.sort_tokens(idx, E)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        routing.sort_tokens(idx, E)
        RK.route_sort(idx.reshape(-1), E, scan=2)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    static = idx.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        routing.sort_tokens(static, E)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = routing.sort_tokens(static, E)
    for seed in (2, 3):
        new = topk_ids(T, E, k, seed=seed, skew=float(seed))
        static.copy_(new)
        graph.replay()
        want = routing.sort_tokens_torch(new, E)
        assert all(torch.equal(a, b) for a, b in zip(outs, want))


# (T, k, E): non-power-of-two sizes, E = 1 and 512, k = 1 / 2 / 8
CASES = [(1, 1, 1), (37, 1, 1), (5, 2, 4), (77, 2, 6), (100, 8, 128), (33, 8, 512), (129, 4, 7), (64, 8, 64)]


@pytest.mark.parametrize("case", CASES, ids=[f"T{t}-k{k}-E{e}" for t, k, e in CASES])
@pytest.mark.parametrize("variant", [
    {}, {"block": 16}, {"block": 32, "scan": 1}, {"block": 16, "scan": 2}, {"block": 64, "scan": 2},
], ids=["rule", "b16", "b32-scan1", "b16-scan2", "b64-scan2"])
def test_equals_torch_sort_random(case, variant):
    T, k, E = case
    assert_same(topk_ids(T, E, k, seed=T + E), E, **variant)


@pytest.mark.parametrize("variant", [
    {"rank": 0}, {"rank": 0, "block": 16}, {"rank": 0, "block": 32, "scan": 2}, {"rank": 1, "block": 64},
], ids=["sort", "sort-b16", "sort-b32-scan2", "pairwise-b64"])
@pytest.mark.parametrize("case", [(77, 2, 6), (40, 8, 128)], ids=["T77-k2-E6", "T40-k8-E128"])
def test_both_rank_variants(case, variant):
    """``tl.sort`` (the GPU default) and the pairwise rank (the interpreter's default) give the same result."""
    T, k, E = case
    assert_same(topk_ids(T, E, k, seed=3), E, **variant)


@pytest.mark.parametrize("E", [1, 8, 130])
@pytest.mark.parametrize("variant", [{}, {"block": 16, "scan": 1}, {"block": 16, "scan": 2}, {"block": 16, "rank": 0}])
def test_adversarial_routings(E, variant):
    T, k = 70, min(2, E)
    one = torch.full((T, k), E - 1, dtype=torch.long, device=DEV)  # every pair to the last expert
    assert_same(one, E, **variant)
    assert_same(torch.zeros(T, 1, dtype=torch.long, device=DEV), E, **variant)  # all to expert 0
    skewed = topk_ids(T, E, k, seed=5, skew=50.0)  # a few busy experts, most idle
    assert_same(skewed, E, **variant)
    assert_same(skewed.flip(0), E, **variant)  # descending-ish order of tokens


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8])
def test_any_index_dtype(dtype):
    idx = topk_ids(50, 100, 3, seed=2).to(dtype)
    assert_same(idx, 100)
    assert_same(idx, 100, block=32)


def test_noncontiguous_index():
    idx = topk_ids(40, 16, 4, seed=9)[:, ::2]
    assert not idx.is_contiguous()
    assert_same(idx, 16, block=16)
    sei, ssi, offs = routing.sort_tokens(idx, 16)
    assert torch.equal(sei, routing.sort_tokens_torch(idx, 16)[0])


@pytest.mark.parametrize("variant", [{"scan": 1}, {"scan": 2}, {"scan": 2, "rank": 0}, {"scan": 1, "rank": 0}])
def test_int64_specialisation_forced(variant):
    """The INT64 launch (taken on its own past 2**31 pairs or chunk-histogram entries), forced on a small input."""
    assert_same(topk_ids(90, 12, 4, seed=4), 12, block=32, int64=True, **variant)
    assert_same(topk_ids(9, 12, 2, seed=4), 12, int64=True)  # one chunk


@pytest.mark.parametrize("variant", [{}, {"block": 16, "scan": 1}, {"block": 16, "scan": 2}, {"block": 16, "rank": 0}])
def test_out_of_range_ids_as_the_torch_path(variant):
    """Expert-parallel sentinels (one id ``>= E``) sort after every expert, outside every range, in token order;
    a negative id sorts first, inside expert 0's range; exactly as the torch path does."""
    E = 6
    idx = topk_ids(45, E, 2, seed=7)
    g = torch.Generator().manual_seed(1)
    sentinel = (torch.rand(idx.shape, generator=g) < 0.3).to(DEV)
    negative = (torch.rand(idx.shape, generator=g) < 0.1).to(DEV)
    for fill in (E, E + 7, 2**20):
        ep = idx.masked_fill(sentinel, fill)
        sei, ssi, offs = assert_same(ep, E, **variant)
        n_in = int((~sentinel).sum())
        assert int(offs[-1]) == n_in and (sei[n_in:] == fill).all()  # no expert's range holds a sentinel
        assert torch.equal(ssi[n_in:], sentinel.reshape(-1).nonzero().flatten())  # token order
    assert_same(idx.masked_fill(negative, -1).masked_fill(sentinel, E), E, **variant)


def test_distinct_out_of_range_ids_keep_token_order():
    """Several distinct sentinels on one side: same ranges and multiset as the torch path, ordered by (token, slot)
    instead of by value (the documented difference)."""
    E = 5
    idx = torch.tensor([[7, 0], [5, 9], [1, 6], [-3, -1], [2, -2]], device=DEV)
    sei, ssi, offs = RK.route_sort(idx.reshape(-1), E, block=16)
    t_sei, t_ssi, t_offs = routing.sort_tokens_torch(idx, E)
    assert torch.equal(offs, t_offs)
    assert ssi.tolist() == [6, 7, 9, 1, 4, 8, 0, 2, 3, 5]  # negatives (token order), 0, 1, 2, then >= E in token order
    assert sei.tolist() == [-3, -1, -2, 0, 1, 2, 7, 5, 9, 6]
    assert sorted(sei.tolist()) == t_sei.tolist()


def test_ids_wider_than_int32_wrap_as_the_torch_path():
    """Both paths compare ``top_k_index.to(torch.int32)``."""
    idx = torch.tensor([[2**32 + 1, 0], [3, 2**33 + 2], [1, 2**31 + 5]], device=DEV)
    assert_same(idx, 4)
    assert_same(idx, 4, block=16, scan=2)


def test_sort_tokens_dispatch(monkeypatch):
    """``sort_tokens`` takes the Triton path here (CUDA or interpreter), the torch path with ``TRITON`` off, for
    float ids, and for an empty input; all equal."""
    idx = topk_ids(33, 10, 3, seed=11)
    monkeypatch.setattr(routing, "_IDS", {})
    out = routing.sort_tokens(idx, 10)
    assert routing._IDS == {}  # the torch path's arange(E) cache was not touched
    monkeypatch.setattr(routing, "TRITON", False)
    ref = routing.sort_tokens(idx, 10)
    assert len(routing._IDS) == 1
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    monkeypatch.setattr(routing, "TRITON", True)
    empty = routing.sort_tokens(idx[:0], 10)
    assert [t.numel() for t in empty] == [0, 0, 10] and (empty[2] == 0).all()
    with pytest.raises(ValueError, match=r"\[tokens, top_k\]"):
        routing.sort_tokens(idx.reshape(-1), 10)


def test_env_switch_turns_the_triton_path_off():
    code = "from host_plugin_scattermoe import routing; print(routing.TRITON)"
    env = {**os.environ, "SCATTERMOE_TRITON_ROUTING": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_no_host_sync_in_the_host_code():
    """No ``.item()`` / ``bool(tensor)`` / ``.tolist()`` on the way (they reach ``aten._local_scalar_dense``): on a
    GPU that would be a device synchronisation and break CUDA-graph capture."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class NoScalar(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                raise AssertionError("host synchronisation in sort_tokens")
            return func(*args, **(kwargs or {}))

    idx = topk_ids(70, 9, 2, seed=12)
    with NoScalar():
        for kw in ({}, {"block": 16, "scan": 1}, {"block": 16, "scan": 2}):
            RK.route_sort(idx.reshape(-1), 9, **kw)
        routing.sort_tokens(idx, 9)
    with pytest.raises(AssertionError, match="host synchronisation"), NoScalar():
        torch.ones(2, device=DEV).sum().item()  # the check itself can fail
