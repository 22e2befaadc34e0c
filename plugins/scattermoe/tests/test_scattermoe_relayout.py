"""The LoRA factors' re-layout through the tiled Triton transpose (``relayout.py``) against torch's copies (CPU,
``TRITON_INTERPRET=1``; on CUDA the same tests run the compiled kernel).

It is a copy and a cast, so every value and gradient must be bitwise torch's, the gradients must come back in the
parameters' own layout and dtype, and the strided ``aten.clone`` copies of the torch path must be gone from the
step (a TorchDispatchMode trace). ``SCATTERMOE_TILED_RELAYOUT=0`` (``relayout.ENABLED = False``) is the torch path.
fp32 -> bf16 casts are checked on the GPU only (the interpreter truncates to bf16; it takes torch's copy there)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from host_plugin_scattermoe import kernels as K
from host_plugin_scattermoe import ops, relayout
from host_plugin_scattermoe.routing import sort_tokens
from host_plugin_scattermoe.testing import DEV, TRITON_RUNS

pytestmark = pytest.mark.skipif(not TRITON_RUNS, reason="Triton needs CUDA or TRITON_INTERPRET=1")

_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's values as integers (a bitwise comparison that also tells -0.0 from 0.0)."""
    return t.detach().contiguous().reshape(-1).view(_INT[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def peft_factors(E, N, K_, r, dtype, seed=0, grad=False):
    """peft's flattened factors (``lora_A (r*E, in)`` expert-major, ``lora_B (out, r*E)`` rank-major) and their
    kernel views ``A [E, r, in]``, ``B [E, out, r]`` (``lora.peft_factors``)."""
    g = torch.Generator().manual_seed(seed)
    wa = (torch.randn(E * r, K_, generator=g)).to(DEV, dtype).requires_grad_(grad)
    # magnitudes from 1e-6 to 1e4: the casts round, subnormals of fp16 included
    wb = (torch.randn(N, r * E, generator=g) * torch.logspace(-6, 4, N * r * E).view(N, r * E)).to(DEV, dtype)
    wb.requires_grad_(grad)
    return wa, wb, wa.view(E, r, K_), wb.view(N, r, E).permute(2, 0, 1)


def torch_kernel_B(B, dtype):
    """The torch path's re-layout (``ops.kernel_lora`` with ``SCATTERMOE_TILED_RELAYOUT=0``)."""
    return B.transpose(1, 2).to(dtype, memory_format=torch.contiguous_format).contiguous().transpose(1, 2)


SIZES = [(4, 6, 3), (1, 5, 1), (1, 40, 3), (3, 1, 2), (7, 33, 5), (2, 70, 17), (16, 96, 16), (5, 3, 1)]
DTYPES = [
    (torch.float32, torch.float32), (torch.float32, torch.float16), (torch.float16, torch.float32),
    (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
    (torch.float32, torch.bfloat16),
]


def _skip_interpreter_bf16(src, dst):
    if K.INTERPRET and dst == torch.bfloat16 and src != torch.bfloat16:
        pytest.skip("the interpreter truncates to bf16; the GPU run checks this cast")


@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{str(d[0])[6:]}->{str(d[1])[6:]}")
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "E{}-N{}-r{}".format(*s))
def test_tiled_relayout_is_torchs_copy_both_ways(size, dtypes):
    """``B`` → kernel layout (forward) and ``dB`` → the parameter's layout (backward): torch's values, bit for bit,
    in the kernels' / the parameter's strides; the tiled kernel ran wherever the layouts make it a transpose."""
    E, N, r = size
    src, dst = dtypes
    _skip_interpreter_bf16(src, dst)
    _, wb, _, B = peft_factors(E, N, 8, r, src)
    got = relayout.kernel_B(B, dst)
    want = torch_kernel_B(B, dst)
    assert same_bits(got, want) and got.transpose(1, 2).is_contiguous()
    plan = relayout.transpose_plan(B.shape, B.stride(), got.stride())
    assert (plan is None) == (sum(n > 1 for n in size) < 2), plan  # one non-trivial dimension: a plain copy
    if plan is not None:  # the kernel itself, not a fallback
        out = torch.full_like(got.transpose(1, 2), float("nan")).transpose(1, 2)
        assert relayout.tiled_copy_(out, B) and same_bits(out, want)
    # the gradient of the kernel-layout factor (as group_outer writes it: contiguous [E, out, r]) back into peft's
    g = (torch.randn(E, N, r, generator=torch.Generator().manual_seed(1)) * 3).to(DEV, dst)
    _skip_interpreter_bf16(dst, src)
    dB = relayout.grad_like(g, src, B.shape, B.stride())
    assert same_bits(dB, g.to(src))
    assert dB.permute(1, 2, 0).is_contiguous()  # peft's lora_B memory order [out, r, E]
    assert dB.permute(1, 2, 0).reshape(N, r * E).data_ptr() == dB.data_ptr()  # a view of it: no copy left


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float32, torch.float16),
                                    (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)],
                         ids=["fp32", "fp32-factors-fp16", "fp16-factors-fp32", "bf16"])
def test_kernel_lora_node_is_bitwise_the_torch_path(dtypes, monkeypatch):
    """``ops.kernel_lora`` (one autograd node) against the torch path: same factors, strides and gradients, and the
    gradients land in peft's parameters in their own layout and dtype."""
    fdt, dt = dtypes
    E, N, K_, r = 5, 37, 19, 3
    res = {}
    for tiled in (True, False):
        monkeypatch.setattr(relayout, "ENABLED", tiled)
        wa, wb, A, B = peft_factors(E, N, K_, r, fdt, grad=True)
        Ak, Bk = ops.kernel_lora(A, B, 2.0, dt)
        ga = torch.randn(Ak.shape, generator=torch.Generator().manual_seed(2)).to(DEV, dt)
        gb = torch.randn(Bk.shape, generator=torch.Generator().manual_seed(3)).to(DEV, dt)
        ((Ak * ga).sum() + (Bk * gb).sum()).float().backward(retain_graph=True)
        first = (wa.grad.clone(), wb.grad.clone())
        ((Ak * ga).sum() + (Bk * gb).sum()).float().backward()  # accumulates into .grad (gradient accumulation)
        res[tiled] = (Ak.detach(), Bk.detach(), wa.grad, wb.grad, *first)
    (a1, b1, ga1, gb1, fa1, fb1), (a0, b0, ga0, gb0, fa0, fb0) = res[True], res[False]
    assert same_bits(a1, a0) and same_bits(b1, b0) and a1.stride() == a0.stride() and b1.stride() == b0.stride()
    assert same_bits(fa1, fa0) and same_bits(fb1, fb0)
    assert same_bits(ga1, ga0) and same_bits(gb1, gb0)
    assert ga1.dtype == gb1.dtype == fdt and ga1.is_contiguous() and gb1.is_contiguous()


class _CopyTrace(TorchDispatchMode):
    """The copies torch makes of whole tensors (``aten.clone``, ``aten._to_copy``) and their shapes."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.clone, torch.ops.aten._to_copy):
            self.copies.append((func.overloadpacket.__name__, tuple(args[0].shape), args[0].dtype))
        return func(*args, **(kwargs or {}))


def _experts_step(merged, dt, fdt, seed=0, E=4, H=24, I=10, k=2, T=9, r=3):
    """The default SiLU-GLU experts call (merged node, or the separate nodes), LoRA on both projections through
    peft's factor views, forward + backward; returns (out, grads, copies traced in the call)."""
    g = torch.Generator().manual_seed(seed)

    def rn(*s, scale=1.0, dtype=dt):
        return (torch.randn(*s, generator=g) * scale).to(DEV, dtype)

    W1, W2 = rn(E, 2 * I, H, scale=H**-0.5), rn(E, H, I, scale=I**-0.5)
    params = {"wa1": rn(E * r, H, scale=H**-0.5, dtype=fdt), "wb1": rn(2 * I, r * E, scale=0.5, dtype=fdt),
              "wa2": rn(E * r, I, scale=I**-0.5, dtype=fdt), "wb2": rn(H, r * E, scale=0.5, dtype=fdt)}
    for p in params.values():
        p.requires_grad_(True)
    x = rn(T, H).requires_grad_(True)
    wts, idx = rn(T, E, dtype=torch.float32).softmax(-1).topk(k, dim=1)
    sei, ssi, offs = sort_tokens(idx, E)
    dout = rn(T, H)
    W1k, W2k = W1.transpose(1, 2), W2.transpose(1, 2)
    trace = _CopyTrace()
    with trace:
        A1, B1 = params["wa1"].view(E, r, H), params["wb1"].view(2 * I, r, E).permute(2, 0, 1)
        A2, B2 = params["wa2"].view(E, r, I), params["wb2"].view(H, r, E).permute(2, 0, 1)
        if merged:
            out = ops.glu_experts(x, W1k, W2k, k, sei, ssi, offs, (A1, B1, 2.0), (A2, B2, 0.5), wts)
        else:
            h = ops.scattered_experts(x, W1k, k, sei, ssi, offs, A1, B1, 2.0, None, False, True, backend="triton")
            h = ops.silu_glu(h, backend="triton")
            y = ops.scattered_experts(h, W2k, 1, sei, ssi, offs, A2, B2, 0.5, None, True, False, backend="triton")
            out = ops.combine(y, wts, backend="triton")
        out.backward(dout)
    return out.detach(), {"x": x.grad, **{n: p.grad for n, p in params.items()}}, trace.copies


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                    (torch.float16, torch.float16)], ids=["fp32", "fp16-lora-fp32", "fp16"])
@pytest.mark.parametrize("merged", [True, False], ids=["merged-node", "separate-nodes"])
def test_experts_step_bitwise_and_without_factor_clones(merged, dtypes, monkeypatch):
    """The whole experts call, tiled re-layout against the torch path: bitwise the same output and gradients; the
    torch path's strided clones of ``lora_B`` (one per projection each way) are gone, and only the casts of a
    factor whose dtype differs from the model's remain (contiguous, ``A`` each way)."""
    monkeypatch.setitem(ops.SETTINGS, "backend", "triton")
    dt, fdt = dtypes
    E, H, I, r = 4, 24, 10, 3
    res = {}
    for tiled in (True, False):
        monkeypatch.setattr(relayout, "ENABLED", tiled)
        res[tiled] = _experts_step(merged, dt, fdt, E=E, H=H, I=I, r=r)
    (o1, g1, c1), (o0, g0, c0) = res[True], res[False]
    assert same_bits(o1, o0)
    for n in g0:
        assert same_bits(g1[n], g0[n]), n
        assert g1[n].is_contiguous() and g1[n].dtype == (fdt if n != "x" else dt), n
    assert any(c[0] == "clone" for c in c0), c0  # the torch path clones lora_B (so this test can fail)
    assert not any(c[0] == "clone" for c in c1), c1
    # what is left: the casts of A when the factors' dtype is not the model's (forward fdt -> dt, backward back)
    want = [] if fdt == dt else [("_to_copy", (E, r, H), fdt), ("_to_copy", (E, r, I), fdt),
                                 ("_to_copy", (E, r, H), dt), ("_to_copy", (E, r, I), dt)]
    assert sorted(c1, key=str) == sorted(want, key=str), c1


_GPU = pytest.mark.skipif(not torch.cuda.is_available() or K.INTERPRET, reason="needs CUDA (not the interpreter)")


@_GPU
@pytest.mark.parametrize("fdt", [torch.bfloat16, torch.float32], ids=["bf16-factors", "fp32-factors"])
@pytest.mark.parametrize("size", [(128, 1536, 16), (128, 2048, 16), (256, 1024, 16), (32, 5760, 16), (8, 28672, 16),
                                  (128, 768, 8), (60, 1000, 7)], ids=lambda s: "E{}-N{}-r{}".format(*s))
def test_gpu_real_shapes_bitwise_both_ways(size, fdt):
    """The compiled kernel at the models' factor shapes, bf16 model: forward (fp32 factors: the cast, round to
    nearest even as torch) and backward into the parameter's layout, bit for bit torch's."""
    E, N, r = size
    _, wb, _, B = peft_factors(E, N, 16, r, fdt)
    got = relayout.kernel_B(B, torch.bfloat16)
    assert relayout.transpose_plan(B.shape, B.stride(), got.stride()) is not None
    assert same_bits(got, torch_kernel_B(B, torch.bfloat16)) and got.transpose(1, 2).is_contiguous()
    g = (torch.randn(E, N, r, device="cuda") * 3).to(torch.bfloat16)
    dB = relayout.grad_like(g, fdt, B.shape, B.stride())
    assert same_bits(dB, g.to(fdt)) and dB.permute(1, 2, 0).is_contiguous()


@_GPU
def test_gpu_int64_offsets_past_2_31_elements():
    """A factor of 2**31 + 2**26 elements: the int64 variant writes the last tiles (both ways)."""
    E, N, r = 68, 1 << 20, 32
    if torch.cuda.mem_get_info()[0] < 20 * 2**30:
        pytest.skip("needs 20 GiB of free GPU memory")
    wb = torch.randn(N, r * E, device="cuda", dtype=torch.bfloat16)
    B = wb.view(N, r, E).permute(2, 0, 1)
    got = relayout.kernel_B(B, torch.bfloat16)
    assert K.needs_int64(B, got)
    for e in (0, E - 1):  # the first and last expert, whole, against a direct read
        assert same_bits(got[e], B[e].contiguous()), e
    del got
    back = relayout.grad_like(B.contiguous(), torch.bfloat16, B.shape, B.stride())  # [E, N, r] -> peft's layout
    assert back.permute(1, 2, 0).is_contiguous() and same_bits(back.permute(1, 2, 0).reshape(N, r * E), wb)


@pytest.mark.parametrize("layout", ["kernel-contiguous", "sliced"])
def test_other_factor_layouts(layout):
    """``B`` handed over in other layouts: contiguous ``[E, out, r]`` (a transpose over ``(out, r)``, batched over
    ``E``), or a slice of a bigger tensor (not dense: the gradient comes back contiguous); values as torch's."""
    E, N, r = 3, 45, 20
    big = torch.randn(E, N, 2 * r, generator=torch.Generator().manual_seed(4)).to(DEV)
    B = big[..., :r].contiguous() if layout == "kernel-contiguous" else big[..., ::2]
    got = relayout.kernel_B(B, torch.float32)
    assert same_bits(got, torch_kernel_B(B, torch.float32)) and got.transpose(1, 2).is_contiguous()
    plan = relayout.transpose_plan(B.shape, B.stride(), got.stride())
    assert (plan is not None) == (layout == "kernel-contiguous")  # a slice along r: no unit stride in the source
    g = torch.randn(E, N, r, generator=torch.Generator().manual_seed(5)).to(DEV).transpose(1, 2).contiguous().transpose(1, 2)
    dB = relayout.grad_like(g, torch.float16, B.shape, B.stride())
    assert same_bits(dB, g.to(torch.float16))
    assert dB.stride() == (B.stride() if layout == "kernel-contiguous" else (N * r, r, 1))
