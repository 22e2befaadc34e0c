"""MXFP4 / NVFP4 against values worked by hand from the OCP MX v1.0 spec, and round-trip properties."""

import math

import pytest
import torch

from host_plugin_mxfp4.formats import (
    E2M1_VALUES,
    FP4Weights,
    dequantize_mxfp4,
    pack_fp4,
    quantize_mxfp4,
    quantize_nvfp4,
    round_to_e2m1,
    unpack_fp4,
)


def _block(vals, n=32):
    return torch.tensor(list(vals) + [0.0] * (n - len(vals)), dtype=torch.float32)


def test_e2m1_codes_and_ties_to_even():
    x = torch.tensor([0.0, 0.25, 0.26, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 5.01, 6.0, 7.0, 1e9])
    # by hand: 0.25 tie -> 0 (even), 0.75 tie -> 1.0, 1.25 -> 1.0, 1.75 -> 2.0, 2.5 -> 2.0, 3.5 -> 4.0,
    # 5.0 -> 4.0, above 6 saturates to 6
    want = [0, 0, 1, 1, 2, 2, 2, 3, 4, 4, 4, 5, 6, 6, 6, 7, 7, 7, 7]
    assert round_to_e2m1(x).tolist() == want
    assert round_to_e2m1(-x).tolist() == [8 + c for c in want]  # sign bit, -0 kept as code 8
    lut = torch.tensor(E2M1_VALUES)
    assert lut[round_to_e2m1(-x).long()][-1].item() == -6.0


def test_pack_low_nibble_first():
    codes = torch.tensor([0x7, 0x5, 0xB, 0x1], dtype=torch.uint8)
    assert pack_fp4(codes).tolist() == [0x57, 0x1B]
    assert unpack_fp4(pack_fp4(codes)).tolist() == codes.tolist()


def test_mxfp4_hand_worked_block():
    # amax 6: floor(log2 6) = 2, shared_exp = 2 - 2 = 0 -> E8M0 byte 127, elements unscaled
    x = _block([6.0, 3.0, -1.5, 0.5, 5.0, 2.5, 0.25, 0.75])
    packed, scales = quantize_mxfp4(x)
    assert scales.tolist() == [127]
    assert packed[:4].tolist() == [0x7 | 0x5 << 4, 0xB | 0x1 << 4, 0x6 | 0x4 << 4, 0x0 | 0x2 << 4]
    assert dequantize_mxfp4(packed, scales, torch.float32)[:8].tolist() == [6.0, 3.0, -1.5, 0.5, 4.0, 2.0, 0.0, 1.0]


def test_mxfp4_scale_choice_and_saturation():
    # amax 7 -> shared_exp 0: 7 lies in [6, 8) and saturates to 6 (spec: clamp normals)
    p, s = quantize_mxfp4(_block([7.0, 1.0]))
    assert s.tolist() == [127] and dequantize_mxfp4(p, s, torch.float32)[:2].tolist() == [6.0, 1.0]
    # amax 8 -> floor(log2 8) = 3 -> shared_exp 1 (byte 128): 8/2 = 4, 1/2 = 0.5
    p, s = quantize_mxfp4(_block([8.0, 1.0]))
    assert s.tolist() == [128] and dequantize_mxfp4(p, s, torch.float32)[:2].tolist() == [8.0, 1.0]
    # amax 0.001 -> floor(log2) = -10 -> shared_exp -12 (byte 115); 0.001 * 2**12 = 4.096 -> 4
    p, s = quantize_mxfp4(_block([0.001]))
    assert s.tolist() == [115] and dequantize_mxfp4(p, s, torch.float32)[0].item() == 4 * 2.0**-12
    # the scale of 2**200 would overflow E8M0 in fp64, but fp32 caps amax < 2**128: byte 127 + 125
    p, s = quantize_mxfp4(_block([3.0e38]))
    assert s.tolist() == [127 + 125]
    # tiny (subnormal) amax: shared_exp clamps at -127 (byte 0)
    p, s = quantize_mxfp4(_block([1e-45]))
    assert s.tolist() == [0]


def test_mxfp4_zero_nan_inf_blocks():
    x = torch.cat([_block([]), _block([1.0, float("nan")]), _block([float("inf"), 2.0]), _block([-float("inf")])])
    p, s = quantize_mxfp4(x)
    assert s.tolist() == [0, 255, 255, 255]
    d = dequantize_mxfp4(p, s, torch.float32)
    assert (d[:32] == 0).all()
    assert torch.isnan(d[32:]).all()  # FP4 has no NaN/Inf: the NaN scale carries it for the block


def test_mxfp4_round_trip_properties():
    torch.manual_seed(0)
    x = torch.randn(8, 64, 256) * torch.logspace(-6, 6, 8).view(8, 1, 1)
    p, s = quantize_mxfp4(x)
    d = dequantize_mxfp4(p, s, torch.float32)
    # idempotent: representable values survive exactly
    p2, s2 = quantize_mxfp4(d)
    assert torch.equal(p2, p) and torch.equal(s2, s)
    # error bound: half the E2M1 spacing (<= 1 at the top) times the scale, or saturation [6, 8) -> 2
    scale = torch.ldexp(torch.ones_like(s, dtype=torch.float32), s.int() - 127).repeat_interleave(32, -1)
    assert ((x - d).abs() <= 2 * scale).all()
    # rounding never moves a value away from zero past the next grid point: |d| <= |x| + spacing/2
    assert (d.abs() <= x.abs() + scale).all()
    rel = ((x - d).norm() / x.norm()).item()
    assert rel < 0.2  # MXFP4 of Gaussian data: ~10%
    # bf16 output is exact too (2 significant bits)
    assert torch.equal(dequantize_mxfp4(p, s, torch.bfloat16).float(), d)


def test_nvfp4_hand_worked():
    # tensor amax 2688 = 6 * 448 -> tensor scale 1.0; block 1 amax 18 -> block scale 3 (E4M3 exact)
    x = torch.zeros(1, 32)
    x[0, 0] = 2688.0
    x[0, 16], x[0, 17], x[0, 18] = 18.0, 9.0, -4.5
    packed, scales, ts = quantize_nvfp4(x)
    assert ts.item() == 1.0
    assert scales.float().tolist() == [[448.0, 3.0]]
    w = FP4Weights(packed, scales, (1, 32), 16, "e4m3", ts)
    d = w.dequantize(torch.float32)[0]
    assert d[0].item() == 2688.0
    assert d[16:19].tolist() == [18.0, 9.0, -4.5]  # 6*3, 3*3, -1.5*3: not powers of two


def test_nvfp4_round_trip_and_nan():
    torch.manual_seed(0)
    x = torch.randn(4, 32, 64)
    w = FP4Weights.quantize(x, "nvfp4")
    d = w.dequantize(torch.float32)
    assert ((x - d).norm() / x.norm()).item() < 0.15
    w2 = FP4Weights.quantize(torch.where(torch.arange(64) == 3, torch.tensor(float("nan")), x), "nvfp4")
    d2 = w2.dequantize(torch.float32)
    assert torch.isnan(d2[..., :16]).all() and not torch.isnan(d2[..., 16:]).any()


def test_container_validation_errors():
    p, s = quantize_mxfp4(torch.randn(2, 4, 64))
    w = FP4Weights(p, s, (2, 4, 64), 32, "e8m0")
    assert w.format == "mxfp4" and w.nbytes == 2 * 4 * 32 + 2 * 4 * 2
    with pytest.raises(TypeError, match="scales for mxfp4 must be torch.uint8"):
        FP4Weights(p, s.view(torch.int8), (2, 4, 64), 32, "e8m0")
    with pytest.raises(TypeError, match="packed must be a uint8"):
        FP4Weights(p.to(torch.int16), s, (2, 4, 64), 32, "e8m0")
    with pytest.raises(ValueError, match="packed has shape"):
        FP4Weights(p, s, (2, 4, 128), 32, "e8m0")
    with pytest.raises(ValueError, match="scales has shape"):
        FP4Weights(p, s[..., :1], (2, 4, 64), 32, "e8m0")
    with pytest.raises(ValueError, match="block_size=32"):
        FP4Weights(p, s, (2, 4, 64), 16, "e8m0")
    with pytest.raises(ValueError, match="scale_kind"):
        FP4Weights(p, s, (2, 4, 64), 32, "ue8m0")
    with pytest.raises(TypeError, match="tensor_scale"):
        FP4Weights(p, torch.zeros(2, 4, 4, dtype=torch.float8_e4m3fn), (2, 4, 64), 16, "e4m3")
    with pytest.raises(ValueError, match="multiple of block_size"):
        FP4Weights(torch.zeros(2, 4, 24, dtype=torch.uint8), torch.zeros(2, 4, 1, dtype=torch.uint8), (2, 4, 48), 32, "e8m0")


def test_gpt_oss_layout_and_select():
    torch.manual_seed(0)
    x = torch.randn(3, 8, 64)
    w = FP4Weights.quantize(x, "mxfp4")
    blocks = w.packed.view(3, 8, 2, 16)  # gpt-oss [E, N, K/32, 16]
    g = FP4Weights.from_gpt_oss(blocks, w.scales)
    assert g.shape == (3, 8, 64) and torch.equal(g.dequantize(), w.dequantize())
    # reference gpt-oss style decode: lo nibble -> even index, hi -> odd, times ldexp(1, s - 127)
    lut = torch.tensor(E2M1_VALUES)
    ref = torch.stack((lut[(blocks & 15).long()], lut[(blocks >> 4).long()]), -1).reshape(3, 8, 2, 32)
    ref = torch.ldexp(ref, w.scales.int().unsqueeze(-1) - 127).reshape(3, 8, 64)
    assert torch.equal(ref, g.dequantize(torch.float32))
    sub = g.select(torch.tensor([2, 0]))
    assert torch.equal(sub.dequantize(), g.dequantize()[[2, 0]])
    with pytest.raises(ValueError, match="does not match"):
        FP4Weights.from_gpt_oss(blocks, w.scales[:, :4])


def test_torchao_interop():
    torchao_mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    torch.manual_seed(0)
    x = torch.randn(4, 64, 128, dtype=torch.bfloat16)
    mx = torchao_mx.MXTensor.to_mx(x, torch.float4_e2m1fn_x2, block_size=32)
    w = FP4Weights.from_torchao(mx)
    assert w.shape == (4, 64, 128)
    assert torch.equal(w.dequantize(torch.float32), mx.dequantize(torch.float32))
    # torchao's default scale choice is the spec's floor: our quantizer agrees bit for bit
    ours = FP4Weights.quantize(x, "mxfp4")
    assert torch.equal(ours.scales, w.scales) and torch.equal(ours.packed, w.packed)
