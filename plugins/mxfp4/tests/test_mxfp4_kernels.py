"""Strategy B kernels (Triton; CPU under TRITON_INTERPRET=1) against the scattermoe torch reference
run on the dequantized weights: forward, dX, dA, dB, in fp32 and fp16, MXFP4 and NVFP4."""

import pytest
import torch

from host_plugin_scattermoe import reference
from host_plugin_scattermoe.routing import sort_tokens

from host_plugin_mxfp4 import kernels as K
from host_plugin_mxfp4.formats import FP4Weights
from host_plugin_mxfp4.ops import fp4_scattered_experts

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or K.INTERPRET), reason="needs CUDA or TRITON_INTERPRET=1 set before import"
)
DEV = "cuda" if torch.cuda.is_available() and not K.INTERPRET else "cpu"


def uniform_scale_factor(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Least-squares a in out ~ a * ref: 1 when right, 2 or 0.5 for an off-by-one E8M0 exponent."""
    o, r = out.double().flatten(), ref.double().flatten()
    return float((o @ r) / (r @ r))


def assert_matches(out, ref, rtol, name):
    err = (out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12)
    assert err < rtol, f"{name}: relative error {err:.2e} >= {rtol}"
    a = uniform_scale_factor(out, ref)
    assert abs(a - 1) < 0.02, f"{name}: outputs are {a:.3f} x the reference (uniform scale error)"


def _case(fmt, dtype, E=4, N=64, Kd=96, T=20, k=2, r=4, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = FP4Weights.quantize(torch.randn(E, N, Kd, generator=g) * 0.1, fmt).to(DEV)
    x = torch.randn(T, Kd, generator=g).to(DEV, dtype)
    # skewed routing: expert 0 gets most rows, the last expert none
    idx = torch.stack([torch.randint(0, E - 1, (T,), generator=g) * (torch.rand(T, generator=g) > 0.5), torch.randint(0, E - 1, (T,), generator=g)], 1)
    idx[:, 1] = torch.where(idx[:, 1] == idx[:, 0], (idx[:, 0] + 1) % (E - 1), idx[:, 1])
    A = (torch.randn(E, r, Kd, generator=g) * 0.1).to(DEV, dtype)
    B = (torch.randn(E, N, r, generator=g) * 0.1).to(DEV, dtype)
    b = (torch.randn(E, N, generator=g) * 0.1).to(DEV, dtype) if bias else None
    return w, x, idx.to(DEV), A, B, b


def _run(fn, w, x, idx, A, B, b, gin, gout, k):
    E = w.shape[0]
    sei, ssi, offs = sort_tokens(idx, E)
    if gin:
        x = x.repeat_interleave(k, 0)[ssi]  # grouped rows
        k = 1
    x = x.detach().requires_grad_(True)
    A = A.detach().requires_grad_(True)
    B = B.detach().requires_grad_(True)
    y = fn(x, w, k, sei, ssi, offs, A, B, 2.0, b, gin, gout)
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(y.shape, generator=g).to(y.device, y.dtype)
    y.backward(dy)
    return y.detach(), x.grad, A.grad, B.grad


def _ref(x, w, k, sei, ssi, offs, A, B, s, b, gin, gout):
    # float64 oracle on the exactly dequantized weights
    W = w.dequantize(torch.float64).transpose(1, 2)
    cast = lambda t: None if t is None else t.double()  # noqa: E731
    out = reference.scattered_linear(cast(x), W, k, sei, ssi, offs, cast(A), cast(B), s, cast(b), gin, gout)
    return out.to(x.dtype)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("gin,gout", [(False, True), (True, False)])
@pytest.mark.parametrize("swap", [0, 1])
def test_fused_matches_reference_fp32(fmt, gin, gout, swap, monkeypatch):
    """Both forms of the kernel (``SWAP``: the decoded tile as the MMA's left operand) under the interpreter; on a GPU
    the autotuner runs them all."""
    monkeypatch.setitem(K._INTERP_CFG, "SWAP", swap)
    w, x, idx, A, B, b = _case(fmt, torch.float32, bias=gout is False)
    got = _run(fp4_scattered_experts, w, x, idx, A, B, b, gin, gout, 2)
    want = _run(_ref, w, x, idx, A, B, b, gin, gout, 2)
    for name, o, r in zip(["y", "dX", "dA", "dB"], got, want):
        assert_matches(o, r, 1e-5, f"{fmt} {name}")


@pytest.mark.parametrize("fmt,N,Kd", [("mxfp4", 40, 96), ("nvfp4", 64, 48)])
def test_fused_matches_reference_with_tails(fmt, N, Kd):
    """A reduction that does not fill the last tile (dX over N = 40, the forward over K = 48 in 32-wide tiles) takes
    the masked loads (``EVEN_I`` false); the output tails are masked too."""
    w, x, idx, A, B, b = _case(fmt, torch.float32, N=N, Kd=Kd)
    got = _run(fp4_scattered_experts, w, x, idx, A, B, b, False, True, 2)
    want = _run(_ref, w, x, idx, A, B, b, False, True, 2)
    for name, o, r in zip(["y", "dX", "dA", "dB"], got, want):
        assert_matches(o, r, 1e-5, f"{fmt} N={N} K={Kd} {name}")


def test_fused_matches_reference_fp16():
    w, x, idx, A, B, b = _case("mxfp4", torch.float16, N=96, Kd=64)
    got = _run(fp4_scattered_experts, w, x, idx, A, B, b, False, True, 2)
    want = _run(_ref, w, x, idx, A, B, b, False, True, 2)
    for name, o, r in zip(["y", "dX", "dA", "dB"], got, want):
        assert_matches(o, r, 3e-3, f"fp16 {name}")


def test_torch_path_takes_fp32_lora_on_half_activations(monkeypatch):
    """Without CUDA or the interpreter B runs the torch reference; peft's fp32 LoRA factors on a
    bf16 model are cast to the compute dtype there too (as scattermoe does), and their gradients
    come back in fp32."""
    monkeypatch.setattr(K, "INTERPRET", False)
    w, x, idx, A, B, b = _case("mxfp4", torch.bfloat16)
    A32, B32 = A.float().requires_grad_(), B.float().requires_grad_()
    sei, ssi, offs = sort_tokens(idx, w.shape[0])
    y = fp4_scattered_experts(x, w, 2, sei, ssi, offs, A32, B32, 2.0)
    want = fp4_scattered_experts(x, w, 2, sei, ssi, offs, A.bfloat16(), B.bfloat16(), 2.0)
    assert y.dtype == torch.bfloat16 and torch.equal(y, want)
    y.float().sum().backward()
    assert A32.grad.dtype == B32.grad.dtype == torch.float32 and A32.grad.abs().sum() > 0


def test_uniform_scale_error_is_caught():
    """An off-by-one E8M0 exponent doubles every output: small per-element noise checks with loose
    tolerances can miss it, the uniform-scale guard cannot."""
    w, x, idx, A, B, b = _case("mxfp4", torch.float32)
    bad = FP4Weights(w.packed, w.scales + 1, w.shape, 32, "e8m0")
    got = _run(fp4_scattered_experts, bad, x, idx, A * 0, B * 0, None, False, True, 2)[0]
    want = _run(_ref, w, x, idx, A * 0, B * 0, None, False, True, 2)[0]
    assert abs(uniform_scale_factor(got, want) - 2.0) < 1e-6
    with pytest.raises(AssertionError, match="uniform scale error|relative error"):
        assert_matches(got, want, 1e-5, "bad scales")


def test_dx_reads_forward_layout_without_copies(monkeypatch):
    """The backward launches the same kernel in dX mode on the forward's container objects."""
    calls = []
    real = K.fp4_scatter2scatter

    def spy(x, w, *a, **kw):
        calls.append((kw.get("reduce_k"), w.packed.data_ptr(), w.scales.data_ptr()))
        return real(x, w, *a, **kw)

    monkeypatch.setattr(K, "fp4_scatter2scatter", spy)
    w, x, idx, A, B, b = _case("mxfp4", torch.float32)
    _run(fp4_scattered_experts, w, x, idx, A, B, b, False, True, 2)
    assert [c[0] for c in calls] == [True, False]
    assert calls[0][1:] == calls[1][1:] == (w.packed.data_ptr(), w.scales.data_ptr())


def test_prune_requires_whole_fp4_blocks_and_counts_extra_smem(monkeypatch):
    import triton

    # 60 KiB (52 KiB after slack): a 64x128x64, 3-stage tile needs 3 x (8 KiB activations + 4 KiB
    # packed bytes + 256 B of block scales) + 16 KiB decoded operand = 52.75 KiB; counting only the
    # activations and the decoded operand (40 KiB) would wrongly keep it
    monkeypatch.setattr(K, "device_limits", lambda index=None: {"smem": 60 * 1024, "regs": 65536})
    split = triton.Config({"BLOCK_M": 64, "BLOCK_J": 64, "BLOCK_I": 16}, num_warps=4, num_stages=2)
    big = triton.Config({"BLOCK_M": 64, "BLOCK_J": 128, "BLOCK_I": 64}, num_warps=4, num_stages=3)
    small = triton.Config({"BLOCK_M": 64, "BLOCK_J": 64, "BLOCK_I": 32}, num_warps=4, num_stages=2)
    x = torch.empty(1, 1, dtype=torch.bfloat16)
    args = {"X": x, "J": 4096, "LORA": 0, "BLOCK_R": 16, "FP4_BLOCK": 32, "SCALE_KIND": 0, "RED_IS_K": 1}
    assert K._prune([split, big, small], args) == [small]
    # dX mode: the output axis is K, so BLOCK_J must hold whole blocks
    odd = triton.Config({"BLOCK_M": 64, "BLOCK_J": 16, "BLOCK_I": 32, "SWAP": 1}, num_warps=4, num_stages=2)
    swapped = triton.Config({**small.kwargs, "SWAP": 1}, num_warps=4, num_stages=2)
    assert K._prune([odd, swapped], {**args, "RED_IS_K": 0}) == [swapped]
    # 16-bit dX keeps only SWAP tiles (the plain form computed wrong dX on an H100); fp32 keeps both
    assert K._prune([small, swapped], {**args, "RED_IS_K": 0}) == [swapped]
    x32 = torch.empty(1, 1, dtype=torch.float32)
    assert K._prune([small, swapped], {**args, "RED_IS_K": 0, "X": x32}) == [small, swapped]
    # a narrow 16-bit dX (K = 64, 32) still gets a SWAP tile from the real list, never a plain one (the fallback
    # used to be the list's first, plain tile)
    monkeypatch.setattr(K, "device_limits", lambda index=None: {"smem": 227 * 1024, "regs": 65536})
    for J in (64, 32):
        got = K._prune(K._configs(), {**args, "RED_IS_K": 0, "J": J, "LORA": 1})
        assert got and all(c.kwargs["SWAP"] and c.kwargs["BLOCK_J"] == 64 for c in got), (J, got)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 37, 96), (53, 64)])
@pytest.mark.parametrize("k_major", [False, True])
@pytest.mark.parametrize("tile", [None, (8, 32, 4)])
def test_dequantize_kernel_is_bit_identical_to_torch(fmt, dtype, shape, k_major, tile):
    """The Triton dequantize (strategy A's weight decode on GPU) equals the torch decode bit for bit,
    including K-major output (transposed experts), ragged tiles (rows, and a byte tile wider than the
    rest of a row: 48 bytes in tiles of 32), and every E2M1 code incl. -0.0."""
    if K.INTERPRET and dtype == torch.bfloat16 and fmt == "nvfp4":
        pytest.skip("the interpreter truncates fp32->bf16 (NVFP4 values need rounding); tests/test_mxfp4_gpu.py checks it")
    g = torch.Generator().manual_seed(11)
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[-1])  # many scale exponents
    c = FP4Weights.quantize(w, fmt)
    want = c.dequantize(dtype, k_major=k_major)  # CPU: the torch path
    lead, (N, Kd) = shape[:-2], shape[-2:]
    out = torch.empty(*lead, Kd, N, dtype=dtype).transpose(-1, -2) if k_major else torch.empty(shape, dtype=dtype)
    got = K.dequantize(c.to(DEV), out.to(DEV), tile=tile)  # compiled on a GPU, interpreted on the CPU
    assert got.stride() == want.stride()
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(got.cpu().contiguous().view(bits), want.contiguous().view(bits))


@pytest.mark.skipif(not K.INTERPRET, reason="the probe's toy check runs under the interpreter")
def test_probe_gemms_match_the_dequantized_weights():
    """``bench/probe_dot_scaled.py``'s bf16 and B-tile GEMM variants (timed on a GPU against bf16), in both operand
    orders, compute x·W_eᵀ; swapping the two nibbles in the interleave fails this."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    import probe_dot_scaled

    probe_dot_scaled.cpu_check()


def _bf16_bits_to_float(h: int) -> float:
    return torch.tensor([h << 16], dtype=torch.int64).to(torch.int32).view(torch.float32).item()


def _float_to_bf16_bits(f: float) -> int:
    return torch.tensor([f], dtype=torch.float32).to(torch.bfloat16).view(torch.int16).item() & 0xFFFF


def _emulate_ptx(asm: str, regs: dict) -> dict:
    """Run the few PTX instructions the E2M1 decode uses (per the PTX ISA) on 32-bit ``regs`` (``$n`` names)."""
    def val(tok):
        return regs[tok] if tok in regs else int(tok, 0)

    for line in asm.splitlines():
        line = line.split("//")[0].strip().rstrip(";")
        if not line or line[0] in "{}.":
            continue
        op, rest = line.split(None, 1)
        d, *src = [t.strip() for t in rest.split(",")]
        a = [val(t) for t in src]
        if op == "mov.b32":
            r = a[0]
        elif op == "shl.b32":
            r = a[0] << a[1]
        elif op == "and.b32":
            r = a[0] & a[1]
        elif op == "or.b32":
            r = a[0] | a[1]
        elif op == "prmt.b32":  # default mode: result byte i = byte (c >> 4i) & 7 of {b, a}
            pool = a[0] | (a[1] << 32)
            r = sum(((pool >> (8 * ((a[2] >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))
        elif op == "fma.rn.bf16x2":
            r = 0
            for lane in (0, 16):
                x, y, z = (_bf16_bits_to_float((v >> lane) & 0xFFFF) for v in a)
                r |= _float_to_bf16_bits(x * y + z) << lane  # exact here: products of E2M1 values and powers of 2
        else:
            raise AssertionError(f"the emulator does not know {op}")
        regs[d] = r & 0xFFFFFFFF
    return regs


def test_bf16_decode_asm_matches_the_spec_on_every_byte_and_scale():
    """``_decode_e2m1_bf16``'s PTX, emulated instruction by instruction on every byte value with E8M0 scales from
    2**-127 (subnormal in bf16) to 2**127 and NaN, in Triton's packing (element i = byte i of $4 and bf16 lane i of
    the output / scale registers), equals the spec's decode (``formats.dequantize_mxfp4``) bit for bit."""
    from host_plugin_mxfp4 import formats

    asm = K._E2M1_BF16_ASM.value
    scales = torch.tensor([0, 1, 100, 126, 127, 128, 200, 254, 255], dtype=torch.uint8)
    byte = torch.arange(256, dtype=torch.uint8)
    for rot in range(len(scales)):
        sc = scales[(torch.arange(256) + rot) % len(scales)]  # each lane its own scale: catches a lane or pair swap
        want = formats.dequantize_mxfp4(byte.view(-1, 1).expand(256, 16).contiguous(), sc.view(-1, 1))[:, :2]
        want = want.view(torch.int16).to(torch.int64) & 0xFFFF  # [256, (low nibble, high nibble)]
        sc_bits = [_float_to_bf16_bits(v) for v in formats.e8m0_to_float(sc).tolist()]
        for g in range(0, 256, 4):
            b = byte[g:g + 4].tolist()
            regs = {"$4": b[0] | b[1] << 8 | b[2] << 16 | b[3] << 24,
                    "$5": sc_bits[g] | sc_bits[g + 1] << 16, "$6": sc_bits[g + 2] | sc_bits[g + 3] << 16}
            out = _emulate_ptx(asm, regs)
            lo = [out["$0"] & 0xFFFF, out["$0"] >> 16, out["$1"] & 0xFFFF, out["$1"] >> 16]
            hi = [out["$2"] & 0xFFFF, out["$2"] >> 16, out["$3"] & 0xFFFF, out["$3"] >> 16]
            for i in range(4):
                for got, w in ((lo[i], want[g + i, 0].item()), (hi[i], want[g + i, 1].item())):
                    nan = (w & 0x7F80) == 0x7F80 and w & 0x7F
                    assert (got & 0x7F80 == 0x7F80 and got & 0x7F) if nan else got == w, (
                        f"byte {b[i]:#04x} scale {sc[g + i].item()}: {got:#06x} != {w:#06x}")
