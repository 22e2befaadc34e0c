"""The fused loss on the Trainer's path (reduction "sum") runs without liger-kernel's two host syncs, with the
same loss and gradients (liger's real kernels; Triton's interpreter on CPU)."""

import pytest
import torch

import host_plugin_liger as plugin
from host_plugin_liger import patching


def _loss_and_grads(reduction: str, frozen_head: bool):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 16, generator=g, requires_grad=True)
    w = (torch.randn(40, 16, generator=g) * 0.3).requires_grad_(not frozen_head)
    y = torch.randint(0, 40, (24,), generator=g)
    y[:5] = -100
    loss = liger_fused_linear_cross_entropy(x, w, y, reduction=reduction)
    if reduction == "sum":  # what liger's causal-LM forward does with the Trainer's num_items_in_batch
        loss = loss / torch.tensor(19.0)
    loss.backward()
    return loss.detach(), x.grad, w.grad


class _Spy:
    """Counts calls of a torch function (and still runs it)."""

    def __init__(self, monkeypatch, owner, name):
        self.calls, real = 0, getattr(owner, name)

        def spy(*a, **kw):
            self.calls += 1
            return real(*a, **kw)

        monkeypatch.setattr(owner, name, spy)


@pytest.mark.parametrize("frozen_head", [True, False])
def test_sum_reduction_skips_both_syncs_with_identical_results(monkeypatch, frozen_head):
    want = _loss_and_grads("sum", frozen_head)
    item, equal = _Spy(monkeypatch, torch.Tensor, "item"), _Spy(monkeypatch, torch, "equal")
    _loss_and_grads("sum", frozen_head)
    assert item.calls >= 1 and equal.calls == 1  # liger-kernel alone: the count's .item() and backward's torch.equal

    plugin._tune_flce(patching, compile_=False, rows=0)
    item.calls = equal.calls = 0
    got = _loss_and_grads("sum", frozen_head)
    assert item.calls == 0 and equal.calls == 0
    for a, b in zip(got, want):
        assert (a is None and b is None) or torch.equal(a, b)


def test_mean_reduction_keeps_liger_path(monkeypatch):
    """With "mean" the kernel divides by the count, so it is read as before (and the results do not change)."""
    want = _loss_and_grads("mean", True)
    plugin._tune_flce(patching, compile_=False, rows=0)
    item = _Spy(monkeypatch, torch.Tensor, "item")
    got = _loss_and_grads("mean", True)
    assert item.calls >= 1
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_item_placeholder_applies_only_inside_the_call():
    from host_plugin_liger import sync_free

    count = torch.tensor(7)
    with sync_free._item_without_sync(123):
        assert count.item() == 123 and torch.tensor(2.5).item() == 2.5 and torch.tensor(True).item() is True
    assert count.item() == 7
