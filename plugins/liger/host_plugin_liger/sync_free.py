"""liger-kernel's fused linear cross-entropy without its two host synchronisations per step.

Why: liger-kernel 0.8.5 reads the number of non-ignored targets with ``.item()`` at the start of the fused
loss forward, and its backward compares the incoming gradient with 1.0 through ``torch.equal``; both wait
for the GPU. The second one costs most: the fused loss enqueues its whole chunked computation (forward and
gradients, ~17 ms of GPU work at 8,192 tokens and a 152k vocabulary) in about a millisecond of CPU time, and
the backward's first node then stops the CPU until all of it has run, instead of letting it enqueue the
decoder layers' recompute and backward meanwhile. In a step that is bound by the host's launch time that
wait is lost outright.

* :func:`forward` wraps liger's chunked forward. With ``reduction="sum"`` (the HF Trainer's path: the model
  gets ``num_items_in_batch`` and divides the summed loss by it) the count is never read: the kernel uses it
  only to divide for ``"mean"`` (and liger for token accuracy, class weights and other backends, which keep
  the original path). There the count's ``.item()`` returns a placeholder instead of synchronising; nothing
  else changes, and the loss and gradients are bit-identical.
* :func:`backward` scales the gradients liger computed in the forward by the incoming gradient
  unconditionally (one small multiply instead of a synchronising comparison that would skip it when the
  gradient is exactly 1.0).
"""

from __future__ import annotations

import contextlib
import functools

import torch

#: liger's default keyword values that keep ``reduction="sum"`` from reading the count
_COUNT_UNUSED = {"ce_weight": None, "return_token_accuracy": False, "ce_impl": None, "token_grad_output": None}


def count_is_unused(args: tuple, kwargs: dict) -> bool:
    """True when liger's forward, called with these arguments, never reads its non-ignored target count."""
    if args:  # liger's autograd function passes everything by keyword; anything else keeps the original path
        return False
    return kwargs.get("reduction") == "sum" and all(kwargs.get(k, v) is v for k, v in _COUNT_UNUSED.items())


@contextlib.contextmanager
def _item_without_sync(placeholder: int):
    """``Tensor.item`` of a 0-dim integer tensor returns ``placeholder`` inside; everything else is unchanged."""
    real = torch.Tensor.item

    def item(self):
        if self.dim() == 0 and not self.is_floating_point() and self.dtype != torch.bool:
            return placeholder
        return real(self)

    torch.Tensor.item = item
    try:
        yield
    finally:
        torch.Tensor.item = real


def forward(original):
    """liger's ``fused_linear_cross_entropy_forward`` without the count's sync where the count is unused."""

    @functools.wraps(original)
    def wrapped(_input, weight, *args, **kwargs):
        if not count_is_unused(args, kwargs):
            return original(_input, weight, *args, **kwargs)
        with _item_without_sync(int(kwargs["target"].numel())):
            return original(_input, weight, *args, **kwargs)

    return wrapped


def backward(original):
    """liger's ``fused_linear_cross_entropy_backward`` without the ``torch.equal(grad_output, 1.0)`` sync."""

    @functools.wraps(original)
    def wrapped(grad_output, grad_input, grad_weight, grad_bias):
        if grad_output is None or grad_output.dim() != 0:
            return original(grad_output, grad_input, grad_weight, grad_bias)
        for grad in (grad_input, grad_weight, grad_bias):
            if grad is not None:
                grad.mul_(grad_output)  # in place like liger's kernel; math in fp32, stored in the gradient's dtype
        return grad_input, grad_weight, grad_bias

    return wrapped
