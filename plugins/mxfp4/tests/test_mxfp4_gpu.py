"""GPU (bf16, real kernels, autotuned): strategy A bit-identical to scattermoe on the dequantized
weights, strategy B within bf16 tolerance of it with the uniform-scale guard. Skipped without CUDA."""

import pytest
import torch
import triton
import triton.language as tl

from host_plugin_mxfp4 import kernels as fp4_kernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _uniform_factor(o, r):
    o, r = o.double().flatten(), r.double().flatten()
    return float((o @ r) / (r @ r))


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_strategies_match_scattermoe_bf16(family):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    import bench_mxfp4 as B

    from host_plugin_mxfp4 import experts as fx
    from host_plugin_mxfp4 import loading

    spec = dict(family=family, E=32, H=1024, I=512, k=4)
    B.T_TOKENS = 1024
    ex = B.make_experts(**spec)
    blk = B.add_lora(B.Block(ex))
    loading.quantize_module(ex, "mxfp4")
    fx.install(blk)
    g = torch.Generator(device="cuda").manual_seed(3)
    x0 = torch.randn(1024, 1024, generator=g, device="cuda").bfloat16()
    dy = torch.randn(1024, 1024, generator=g, device="cuda").bfloat16()
    routes = {kind: B.routing(1024, 32, 4, kind) for kind in ("balanced", "skewed")}
    checks = []
    B.correctness("gpu-test", spec, blk, ex, x0, dy, routes, checks)
    for c in checks:
        if c["check"].startswith("selective"):
            assert c["bitwise"], c
        else:
            assert c["rel_err"] < 2e-2 and abs(c["scale_factor"] - 1) < 0.02, c


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("k_major", [False, True])
def test_dequantize_kernel_bitwise_at_real_shape(fmt, k_major):
    """The Triton dequantize on the GPU equals the torch decode on the CPU, bf16, at the Qwen3-30B-A3B
    up-projection shape (16 of 128 experts: [16, 1536, 2048]), and the last rows are written."""
    from host_plugin_mxfp4.formats import FP4Weights

    g = torch.Generator().manual_seed(0)
    c = FP4Weights.quantize(torch.randn(16, 1536, 2048, generator=g) * 0.02, fmt)
    want = c.dequantize(torch.bfloat16, k_major=k_major)
    got = c.to("cuda").dequantize(torch.bfloat16, k_major=k_major)
    assert got.stride() == want.stride()
    assert torch.equal(got.cpu().contiguous().view(torch.int16), want.contiguous().view(torch.int16))



@triton.jit
def _decode_both(Wq, Sc, Out, N, K_, BN: tl.constexpr, BK: tl.constexpr):
    """Strategy B's weight tile decoded by the fp32 path into ``Out[0]`` and by the bf16x2 PTX into ``Out[1]``."""
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    k0 = tl.program_id(1) * BK
    k = k0 + tl.arange(0, BK)
    ptr = Out + n[:, None] * K_ + k[None, :]
    for asm in tl.static_range(2):
        w = fp4_kernels._fp4_tile(Wq, Sc, n, n < N, k0, K_, K_ // 2, 1, K_ // 32, 1, tl.bfloat16, 0, 32, BN, BK,
                                  asm == 1, True)
        tl.store(ptr + asm * N * K_, w)


def test_bf16_decode_asm_bitwise_equals_the_fp32_decode():
    """Strategy B's weight tile (``kernels._fp4_tile``) with the bf16x2 PTX decode equals the fp32 decode bit for bit
    on the GPU, over every packed byte and every E8M0 scale (NaN and 2**-127 included), at two tile shapes: checks the
    inline assembly's packing of elements into registers, which the CPU test can only emulate."""
    g = torch.Generator().manual_seed(0)
    N, Kd = 256, 1024
    packed = torch.randint(0, 256, (N, Kd // 2), generator=g, dtype=torch.uint8)
    packed[0, :256] = torch.arange(256, dtype=torch.uint8)  # every byte at least once
    scales = torch.randint(0, 256, (N, Kd // 32), generator=g, dtype=torch.uint8)
    scales[1, :] = torch.arange(0, 256, 8, dtype=torch.uint8)
    scales[2, :2] = torch.tensor([0, 255], dtype=torch.uint8)
    for bn, bk in ((64, 64), (128, 128)):
        out = torch.empty(2, N, Kd, device="cuda", dtype=torch.bfloat16)
        _decode_both[(N // bn, Kd // bk)](packed.cuda(), scales.cuda(), out, N, Kd, BN=bn, BK=bk)
        fp32, asm = out.view(torch.int16).cpu()
        nan = torch.isnan(out[0].cpu())
        assert torch.equal(nan, torch.isnan(out[1].cpu())), (bn, bk)
        assert torch.equal(fp32[~nan], asm[~nan]), f"tile {bn}x{bk}: {(fp32 != asm).sum().item()} values differ"
