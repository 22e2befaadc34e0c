"""The eager host path's shortcuts give the same launches and tensors as the long way (CPU, no kernels run).

The GPU tests (``test_scattermoe_gpu.py``) run the cached launch plans at real shapes; these check the pieces that
make a repeated launch cheaper on the host: integer helpers, the one-copy LoRA preparation, the lazy tile rule and
the cached ``arange(E)`` of the routing."""

import pytest
import torch
import triton

from host_plugin_scattermoe import kernels as K
from host_plugin_scattermoe import ops, routing


def test_host_int_helpers_match_triton():
    for n in [*range(0, 2100), 2**31 - 1, 2**31, 2**31 + 1, 10**12]:
        assert K._next_pow2(n) == triton.next_power_of_2(n), n
    for a in range(0, 700):
        for b in (1, 3, 16, 64, 128, 256):
            assert K._cdiv(a, b) == triton.cdiv(a, b), (a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_lora_is_cast_then_kernel_strides(dtype):
    """peft's factors (fp32, lora_B rank-major) → kernel layout: same values, strides and gradients as
    ``kernel_strides(*cast_lora(...))``, and the factors themselves when nothing needs changing."""
    E, N, r, Kd = 4, 6, 3, 5
    wa = torch.randn(E * r, Kd, requires_grad=True)
    wb = torch.randn(N, r * E, requires_grad=True)
    A, B = wa.view(E, r, Kd), wb.view(N, r, E).permute(2, 0, 1)
    a1, b1 = ops.kernel_strides(*ops.cast_lora(A, B, 2.0, dtype))
    a2, b2 = ops.kernel_lora(A, B, 2.0, dtype)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert a1.stride() == a2.stride() and b1.stride() == b2.stride() and b2.transpose(1, 2).is_contiguous()
    g = torch.randn(E, N, r)
    want = torch.autograd.grad((b1.float() * g).sum() + a1.float().sum(), (wa, wb))
    got = torch.autograd.grad((b2.float() * g).sum() + a2.float().sum(), (wa, wb))
    assert all(torch.equal(w, h) for w, h in zip(want, got))
    assert ops.kernel_lora(A, B, 0.0, dtype) == (None, None) and ops.kernel_lora(None, None, 1.0, dtype) == (None, None)
    with pytest.raises(ValueError, match="both"):
        ops.kernel_lora(A, None, 1.0, dtype)
    ready_A, ready_B = a2.detach(), b2.detach()
    same = ops.kernel_lora(ready_A, ready_B, 1.0, dtype)
    assert same[0] is ready_A and same[1].data_ptr() == ready_B.data_ptr()  # no copy when already in kernel layout


def test_pick_tiles_builds_the_rule_only_on_a_miss(monkeypatch):
    monkeypatch.setattr(K, "_PICKED", {})
    monkeypatch.setattr(K, "device_limits", lambda index=None: {"smem": 232448, "regs": 65536})
    calls = []

    def rule():
        calls.append(1)
        return K.s2s_rule(32768, 128, 2048, 1536, 1, tma=True)

    args = {"X": torch.empty(1, 1, dtype=torch.bfloat16), "N": 1536, "LORA": 1, "BLOCK_R": 16}
    first = K.pick_tiles("s2s", ("k",), rule, args)
    assert first == K.pick_tiles("s2s", ("k",), rule, args) == K.pick_tiles("s2s", ("k",), rule(), args)
    assert len(calls) == 2  # the miss, and the list passed explicitly above; never on a hit
    assert first == K.pick_tiles("s2s", ("k2",), K.s2s_rule(32768, 128, 2048, 1536, 1, tma=True), args)


def test_sort_tokens_reuses_its_expert_ids(monkeypatch):
    monkeypatch.setattr(routing, "_IDS", {})
    idx = torch.tensor([[2, 0], [2, 4], [0, 2]])
    first = routing.sort_tokens_torch(idx, 6)
    ids = routing._IDS[(6, idx.device)]
    assert ids.tolist() == list(range(6)) and ids.dtype == torch.int32
    second = routing.sort_tokens_torch(idx, 6)
    assert routing._IDS[(6, idx.device)] is ids and len(routing._IDS) == 1
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert second[2].tolist() == [2, 2, 5, 5, 6, 6]
