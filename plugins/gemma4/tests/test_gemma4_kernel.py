"""Fused RMSNorm+RoPE kernel vs the eager composition transformers' Gemma 4 runs."""

import pytest
import torch

from host_plugin_gemma4.rms_norm_rope import eager_rms_norm_rope, fused_rms_norm, fused_rms_norm_rope

CASES = [(True, True), (False, True), (False, False), (True, False)]  # (has_weight, rope)


def _run(fn, x, w, cos, sin, g):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_() if w is not None else None
    y = fn(x, w, cos, sin)
    y.backward(g)
    return y.detach(), x.grad, (w.grad if w is not None else None)


@pytest.mark.parametrize("has_w,rope", CASES)
@pytest.mark.parametrize("D", [16, 24])  # 24: half=12 is not a power of two (masked lanes)
def test_gemma4_kernel_matches_eager_fp32(has_w, rope, D, device):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, D, device=device) * 3
    w = torch.randn(D, device=device) * 0.2 + 1 if has_w else None
    cos = torch.randn(2, 5, D, device=device) if rope else None
    sin = torch.randn(2, 5, D, device=device) if rope else None
    g = torch.randn(2, 5, 3, D, device=device)
    y, gx, gw = _run(fused_rms_norm_rope, x, w, cos, sin, g)
    y0, gx0, gw0 = _run(eager_rms_norm_rope, x, w, cos, sin, g)
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx0, rtol=1e-4, atol=1e-5)
    if has_w:
        torch.testing.assert_close(gw, gw0, rtol=1e-4, atol=1e-4)


def test_gemma4_kernel_v_norm_and_strided_input(device):
    """v_norm (no scale, no rope) on a non-contiguous view, as q_proj(...).view(...) can produce."""
    torch.manual_seed(1)
    big = torch.randn(2, 7, 4 * 16 + 8, device=device)
    x = big[..., :64].view(2, 7, 4, 16) if big[..., :64].is_contiguous() else big[..., :64].reshape(2, 7, 4, 16)
    y = fused_rms_norm(x, None, 1e-6)
    torch.testing.assert_close(y, eager_rms_norm_rope(x, None, None, None, 1e-6))


def test_gemma4_kernel_rejects_half_rope_args():
    with pytest.raises(ValueError, match="both cos and sin"):
        fused_rms_norm_rope(torch.randn(1, 2, 2, 8), None, torch.randn(1, 2, 8), None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernel check needs a CUDA GPU")
@pytest.mark.parametrize("has_w,rope", CASES)
@pytest.mark.parametrize("D", [256, 512])
def test_gemma4_kernel_bf16_gpu(has_w, rope, D):
    torch.manual_seed(0)
    B, S, H = 2, 256, 8
    x = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(D, device="cuda") * 0.2 + 1).to(torch.bfloat16) if has_w else None
    ang = torch.randn(B, S, D, device="cuda")
    cos, sin = (ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)) if rope else (None, None)
    g = torch.randn_like(x)
    y, gx, gw = _run(fused_rms_norm_rope, x, w, cos, sin, g)
    # oracle: the eager composition in fp32 (the kernel computes in fp32 and rounds once)
    y32, gx32, gw32 = _run(eager_rms_norm_rope, x.float(), w.float() if has_w else None,
                           cos.float() if rope else None, sin.float() if rope else None, g.float())
    yb, gxb, gwb = _run(eager_rms_norm_rope, x, w, cos, sin, g)  # what transformers computes in bf16
    err = (y.float() - y32).abs().max().item()
    assert err <= 2 * (yb.float() - y32).abs().max().item() + 1e-2
    torch.testing.assert_close(y.float(), y32, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx.float(), gx32, rtol=2e-2, atol=2e-2)
    if has_w:
        torch.testing.assert_close(gw.float(), gw32, rtol=2e-2, atol=0.5)
