"""MXFP4 and NVFP4 in plain torch: quantize, dequantize, and the packed weights container.

MXFP4 (OCP Microscaling Formats v1.0, "MXFP4"):
    * elements are FP4 E2M1 (1 sign, 2 exponent bits with bias 1, 1 mantissa bit): the magnitudes
      0, 0.5 (subnormal), 1, 1.5, 2, 3, 4, 6. There is no Inf and no NaN encoding.
    * one E8M0 scale per block of 32 elements: an unsigned byte ``s`` meaning ``2**(s - 127)``;
      ``s == 0xFF`` is NaN (the only special value).
    * scale choice (spec section 6.3): ``shared_exp = floor(log2(max|V|)) - emax_elem`` with
      ``emax_elem = 2`` (the largest E2M1 normal is ``1.5 * 2**2``), clamped to the E8M0 range
      ``[-127, 127]``; then every element is ``V / 2**shared_exp`` rounded to the nearest E2M1 value,
      ties to even, saturating at +-6 (values in ``[6, 8)`` after scaling clamp to 6).
    * a block holding NaN or +-Inf cannot be represented by E2M1 elements, so its scale is NaN
      (0xFF) and the whole block dequantizes to NaN. An all-zero block gets the smallest scale
      (shared_exp clamped to -127, byte 0) and zero elements.
    * packing: two elements per byte, the even index in the low nibble, the odd one in the high
      nibble (the layout of gpt-oss checkpoints, torchao and ``torch.float4_e2m1fn_x2``).

NVFP4 (NVIDIA): the same E2M1 elements, one FP8 E4M3 scale per block of 16, times one fp32
per-tensor scale: ``value = e2m1 * e4m3_block_scale * tensor_scale``. The tensor scale is
``amax(|W|) / (6 * 448)`` so every block scale ``amax_block / 6 / tensor_scale`` fits E4M3
(max 448); block scales are rounded to E4M3 (nearest, ties to even) and elements then quantized
against the rounded scale. A block with NaN/Inf gets a NaN block scale.

Layout convention of :class:`FP4Weights`: the last axis is the one the blocks run along (the
reduction axis K of ``y = x @ W.T`` for a weight stored ``[..., N, K]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "E2M1_VALUES",
    "FP4Weights",
    "dequantize_mxfp4",
    "dequantize_nvfp4",
    "e8m0_to_float",
    "pack_fp4",
    "quantize",
    "quantize_mxfp4",
    "quantize_nvfp4",
    "round_to_e2m1",
    "unpack_fp4",
]

MX_BLOCK = 32
NV_BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E2M1_EMAX = 2  # exponent of the largest normal E2M1 value (6 = 1.5 * 2**2)
E8M0_BIAS = 127
E8M0_NAN = 0xFF

#: FP4 E2M1 value of each 4-bit code (bit 3 = sign).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

# Decision points between neighbouring E2M1 magnitudes and which side a tie goes to (the
# neighbour with an even mantissa bit, i.e. the even code): 0.25 -> 0, 0.75 -> 1.0, 1.25 -> 1.0,
# 1.75 -> 2.0, 2.5 -> 2.0, 3.5 -> 4.0, 5.0 -> 4.0.
_ROUND_DOWN_ON_TIE = (0.25, 1.25, 2.5, 5.0)
_ROUND_UP_ON_TIE = (0.75, 1.75, 3.5)

_LUT_CACHE: dict[tuple, torch.Tensor] = {}


def _lut(device, dtype=torch.float32) -> torch.Tensor:
    key = ("e2m1", str(device), dtype)
    if key not in _LUT_CACHE:
        _LUT_CACHE[key] = torch.tensor(E2M1_VALUES, dtype=dtype, device=device)
    return _LUT_CACHE[key]


def _e8m0_table(device) -> torch.Tensor:
    """fp32 value of every E8M0 byte: 2**(s-127) (exact, 2**-127 is an fp32 subnormal), NaN at 255."""
    key = ("e8m0", str(device))
    if key not in _LUT_CACHE:
        t = torch.tensor([2.0 ** (s - E8M0_BIAS) for s in range(255)] + [float("nan")], dtype=torch.float64)
        _LUT_CACHE[key] = t.to(torch.float32).to(device)
    return _LUT_CACHE[key]


def e8m0_to_float(scales: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes (uint8) -> fp32 scale values."""
    if scales.dtype != torch.uint8:
        raise TypeError(f"E8M0 scales must be uint8, got {scales.dtype}")
    return _e8m0_table(scales.device)[scales.long()]


def round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round already-scaled fp32 values to 4-bit E2M1 codes (uint8, 0..15): nearest, ties to even,
    saturating to +-6. NaN inputs give code 0 (callers mark NaN blocks through the scale)."""
    a = x.abs()
    code = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for t in _ROUND_DOWN_ON_TIE:
        code += (a > t).to(torch.uint8)
    for t in _ROUND_UP_ON_TIE:
        code += (a >= t).to(torch.uint8)
    sign = torch.signbit(x) & ~torch.isnan(x)
    return code | (sign.to(torch.uint8) << 3)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """``[..., K]`` codes -> ``[..., K/2]`` bytes, even index in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4: the last dim must be even, got {codes.shape[-1]}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """``[..., K/2]`` bytes -> ``[..., K]`` codes."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    if x.shape[-1] % block:
        raise ValueError(f"the last dim ({x.shape[-1]}) must be a multiple of the block size {block}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def quantize_mxfp4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4-quantize ``x`` along its last axis: ``(packed uint8 [..., K/2], E8M0 uint8 [..., K/32])``."""
    xb = _blocks(x.float(), MX_BLOCK)
    nonfinite = (~torch.isfinite(xb)).any(dim=-1)
    amax = torch.where(torch.isfinite(xb), xb.abs(), torch.zeros((), device=x.device)).amax(dim=-1)
    # floor(log2(amax)) exactly, subnormals included: amax = m * 2**e with m in [0.5, 1)
    _, e = torch.frexp(amax)
    shared = (e.to(torch.int32) - 1) - E2M1_EMAX
    shared = torch.where(amax > 0, shared, torch.full_like(shared, -E8M0_BIAS)).clamp(-E8M0_BIAS, E8M0_BIAS)
    # V / 2**shared is exact (a power-of-two multiply); 2**-shared fits fp32 for shared in [-127, 127]
    inv = _e8m0_table(x.device)[(E8M0_BIAS - shared).long()]
    codes = round_to_e2m1(xb * inv.unsqueeze(-1))
    codes = torch.where(nonfinite.unsqueeze(-1), torch.zeros_like(codes), codes)
    scales = (shared + E8M0_BIAS).to(torch.uint8)
    scales = torch.where(nonfinite, torch.full_like(scales, E8M0_NAN), scales)
    return pack_fp4(codes.reshape(x.shape)), scales


def dequantize_mxfp4(packed: torch.Tensor, scales: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """Inverse of :func:`quantize_mxfp4` (exact: every MXFP4 value is representable in fp32)."""
    vals = _lut(packed.device)[unpack_fp4(packed).long()]
    vals = _blocks(vals, MX_BLOCK) * e8m0_to_float(scales).unsqueeze(-1)
    return vals.reshape(*packed.shape[:-1], packed.shape[-1] * 2).to(dtype)


def nvfp4_tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """The fp32 per-tensor NVFP4 scale: ``amax / (6 * 448)`` over finite values (1.0 for all-zero)."""
    xf = x.float()
    amax = torch.where(torch.isfinite(xf), xf.abs(), torch.zeros((), device=x.device)).amax()
    return torch.where(amax > 0, amax / (E2M1_MAX * E4M3_MAX), torch.ones((), device=x.device))


def quantize_nvfp4(
    x: torch.Tensor, tensor_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4-quantize along the last axis: ``(packed uint8, E4M3 block scales [..., K/16], fp32 tensor scale)``."""
    if tensor_scale is None:
        tensor_scale = nvfp4_tensor_scale(x)
    tensor_scale = tensor_scale.to(device=x.device, dtype=torch.float32).reshape(())
    xb = _blocks(x.float(), NV_BLOCK)
    nonfinite = (~torch.isfinite(xb)).any(dim=-1)
    amax = torch.where(torch.isfinite(xb), xb.abs(), torch.zeros((), device=x.device)).amax(dim=-1)
    block = (amax / E2M1_MAX / tensor_scale).clamp(max=E4M3_MAX)
    block = torch.where(nonfinite, torch.full_like(block, float("nan")), block)
    block_e4m3 = block.to(torch.float8_e4m3fn)
    denom = block_e4m3.float() * tensor_scale
    scaled = torch.where(denom.unsqueeze(-1) > 0, xb / denom.unsqueeze(-1), torch.zeros_like(xb))
    codes = round_to_e2m1(scaled)
    codes = torch.where(nonfinite.unsqueeze(-1), torch.zeros_like(codes), codes)
    return pack_fp4(codes.reshape(x.shape)), block_e4m3, tensor_scale


def dequantize_nvfp4(
    packed: torch.Tensor, scales: torch.Tensor, tensor_scale: torch.Tensor, dtype=torch.bfloat16
) -> torch.Tensor:
    vals = _lut(packed.device)[unpack_fp4(packed).long()]
    s = scales.float() * tensor_scale.to(device=packed.device, dtype=torch.float32)
    vals = _blocks(vals, NV_BLOCK) * s.unsqueeze(-1)
    return vals.reshape(*packed.shape[:-1], packed.shape[-1] * 2).to(dtype)


# --- container ------------------------------------------------------------------------------

_KINDS = {
    # scale kind -> (format name, block size, scale dtype)
    "e8m0": ("mxfp4", MX_BLOCK, torch.uint8),
    "e4m3": ("nvfp4", NV_BLOCK, torch.float8_e4m3fn),
}
FORMATS = {"mxfp4": "e8m0", "nvfp4": "e4m3"}


@dataclass(frozen=True)
class FP4Weights:
    """Packed FP4 weights of shape ``shape`` (``[..., N, K]``), blocked along K.

    ``packed``: uint8 ``[..., N, K/2]``; ``scales``: ``[..., N, K/block_size]``, uint8 E8M0 bytes
    (``scale_kind="e8m0"``, MXFP4) or ``torch.float8_e4m3fn`` (``"e4m3"``, NVFP4, which also needs
    the fp32 0-d ``tensor_scale``). Construction validates everything; a mismatch raises
    ``ValueError``/``TypeError`` naming the field, never reinterprets bytes.
    """

    packed: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, ...]
    block_size: int
    scale_kind: str
    tensor_scale: torch.Tensor | None = None

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.scale_kind not in _KINDS:
            raise ValueError(f"FP4Weights.scale_kind must be one of {sorted(_KINDS)}, got {self.scale_kind!r}")
        fmt, block, sdtype = _KINDS[self.scale_kind]
        if self.block_size != block:
            raise ValueError(f"FP4Weights: {fmt} ({self.scale_kind} scales) needs block_size={block}, got {self.block_size}")
        if not isinstance(self.packed, torch.Tensor) or self.packed.dtype != torch.uint8:
            raise TypeError(f"FP4Weights.packed must be a uint8 tensor, got {getattr(self.packed, 'dtype', type(self.packed))}")
        if not isinstance(self.scales, torch.Tensor) or self.scales.dtype != sdtype:
            raise TypeError(
                f"FP4Weights.scales for {fmt} must be {sdtype}, got {getattr(self.scales, 'dtype', type(self.scales))}"
                + (" (convert E8M0 with .view(torch.uint8) explicitly)" if sdtype == torch.uint8 else "")
            )
        if len(self.shape) < 2:
            raise ValueError(f"FP4Weights.shape must have at least 2 dims [..., N, K], got {self.shape}")
        k = self.shape[-1]
        if k % block:
            raise ValueError(f"FP4Weights: K={k} (shape {self.shape}) is not a multiple of block_size {block}")
        want_packed = (*self.shape[:-1], k // 2)
        if tuple(self.packed.shape) != want_packed:
            raise ValueError(f"FP4Weights.packed has shape {tuple(self.packed.shape)}, expected {want_packed} for shape {self.shape}")
        want_scales = (*self.shape[:-1], k // block)
        if tuple(self.scales.shape) != want_scales:
            raise ValueError(f"FP4Weights.scales has shape {tuple(self.scales.shape)}, expected {want_scales} for shape {self.shape}")
        if self.scales.device != self.packed.device:
            raise ValueError(f"FP4Weights: packed on {self.packed.device} but scales on {self.scales.device}")
        if self.scale_kind == "e4m3":
            ts = self.tensor_scale
            if not isinstance(ts, torch.Tensor) or ts.dtype != torch.float32 or ts.numel() != 1:
                raise TypeError("FP4Weights: nvfp4 needs tensor_scale, a one-element fp32 tensor")
            object.__setattr__(self, "tensor_scale", ts.reshape(()).to(self.packed.device))
        elif self.tensor_scale is not None:
            raise ValueError("FP4Weights: mxfp4 (e8m0 scales) takes no tensor_scale")

    # --- properties
    @property
    def format(self) -> str:
        return _KINDS[self.scale_kind][0]

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        n = self.packed.numel() + self.scales.numel() * self.scales.element_size()
        return n + (4 if self.tensor_scale is not None else 0)

    # --- construction
    @classmethod
    def quantize(cls, w: torch.Tensor, fmt: str = "mxfp4") -> FP4Weights:
        if fmt == "mxfp4":
            packed, scales = quantize_mxfp4(w)
            return cls(packed, scales, tuple(w.shape), MX_BLOCK, "e8m0")
        if fmt == "nvfp4":
            packed, scales, ts = quantize_nvfp4(w)
            return cls(packed, scales, tuple(w.shape), NV_BLOCK, "e4m3", ts)
        raise ValueError(f"unknown FP4 format {fmt!r}; use 'mxfp4' or 'nvfp4'")

    @classmethod
    def from_gpt_oss(cls, blocks: torch.Tensor, scales: torch.Tensor) -> FP4Weights:
        """gpt-oss checkpoint tensors (``*_blocks`` uint8 ``[E, N, K/32, 16]``, ``*_scales`` uint8
        ``[E, N, K/32]``) as a container, without copying or dequantizing."""
        if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
            raise TypeError(f"gpt-oss blocks/scales must be uint8, got {blocks.dtype}/{scales.dtype}")
        if blocks.ndim < 3 or blocks.shape[-1] != MX_BLOCK // 2:
            raise ValueError(f"gpt-oss *_blocks must be [..., N, K/32, 16], got {tuple(blocks.shape)}")
        if tuple(scales.shape) != tuple(blocks.shape[:-1]):
            raise ValueError(f"gpt-oss *_scales shape {tuple(scales.shape)} does not match *_blocks {tuple(blocks.shape)}")
        nb = blocks.shape[-2]
        shape = (*blocks.shape[:-2], nb * MX_BLOCK)
        return cls(blocks.reshape(*blocks.shape[:-2], nb * (MX_BLOCK // 2)), scales, shape, MX_BLOCK, "e8m0")

    @classmethod
    def from_torchao(cls, t) -> FP4Weights:
        """A torchao ``MXTensor`` (elem dtype ``float4_e2m1fn_x2``, block 32) or ``NVFP4Tensor``."""
        name = type(t).__name__
        qdata = getattr(t, "qdata", None)
        if qdata is None:
            raise TypeError(f"from_torchao: {name} has no qdata; expected a torchao MXTensor/NVFP4Tensor")
        if name == "MXTensor":
            if getattr(t, "elem_dtype", None) != getattr(torch, "float4_e2m1fn_x2", object()) or t.block_size != MX_BLOCK:
                raise ValueError(f"from_torchao: only MXFP4 (float4_e2m1fn_x2, block 32) is supported, got {t.elem_dtype}/{t.block_size}")
            scale = t.scale
            if scale.dtype != torch.float8_e8m0fnu:
                raise TypeError(f"from_torchao: MXTensor scale dtype {scale.dtype}, expected float8_e8m0fnu")
            packed = qdata.view(torch.uint8) if qdata.dtype != torch.uint8 else qdata
            return cls(packed, scale.view(torch.uint8).reshape(*t.shape[:-1], t.shape[-1] // MX_BLOCK), tuple(t.shape), MX_BLOCK, "e8m0")
        if name == "NVFP4Tensor":
            scale = t.scale if hasattr(t, "scale") else t._scale_e4m3
            ts = getattr(t, "per_tensor_scale", None)
            ts = torch.ones((), dtype=torch.float32, device=qdata.device) if ts is None else ts.float()
            packed = qdata.view(torch.uint8) if qdata.dtype != torch.uint8 else qdata
            return cls(packed, scale.reshape(*t.shape[:-1], t.shape[-1] // NV_BLOCK), tuple(t.shape), NV_BLOCK, "e4m3", ts)
        raise TypeError(f"from_torchao: unsupported type {name}")

    # --- use
    def empty_dequantized(self, dtype=torch.bfloat16, k_major: bool = False) -> torch.Tensor:
        """An uninitialised ``[..., N, K]`` buffer in the layout :meth:`dequantize` returns."""
        N, K = self.shape[-2:]
        lead = self.shape[:-2]
        if k_major:
            return torch.empty(*lead, K, N, dtype=dtype, device=self.device).transpose(-1, -2)
        return torch.empty(self.shape, dtype=dtype, device=self.device)

    def dequantize(self, dtype=torch.bfloat16, k_major: bool = False, chunk_bytes: int = 256 << 20) -> torch.Tensor:
        """The ``[..., N, K]`` values in ``dtype`` (exact for bf16/fp32). ``k_major=True`` stores them
        K-major (the result is the transpose of a contiguous ``[..., K, N]``, the layout of
        transformers' transposed experts). On CUDA one Triton pass decodes straight into the result;
        elsewhere torch does it with fp32 scratch bounded by ``chunk_bytes`` (chunks along dim 0)."""
        def one(packed, scales):
            if self.scale_kind == "e8m0":
                return dequantize_mxfp4(packed, scales, torch.float32)
            return dequantize_nvfp4(packed, scales, self.tensor_scale, torch.float32)

        lead = self.shape[:-2]
        out = self.empty_dequantized(dtype, k_major)
        if self.packed.is_cuda and len(self.shape) <= 3:  # one Triton pass: 4.25 bits in, `dtype` out
            from host_plugin_mxfp4 import kernels

            return kernels.dequantize(self, out)
        if not lead:
            return out.copy_(one(self.packed, self.scales))
        per = max(1, chunk_bytes // max(1, 4 * (self.packed[0].numel() * 2)))
        for s0 in range(0, lead[0], per):
            out[s0 : s0 + per].copy_(one(self.packed[s0 : s0 + per], self.scales[s0 : s0 + per]))
        return out

    def select(self, index: torch.Tensor) -> FP4Weights:
        """The experts ``index`` (along dim 0) as a new container (packed data gathered, 4.25 bits/weight)."""
        return FP4Weights(
            self.packed.index_select(0, index),
            self.scales.index_select(0, index),
            (int(index.numel()), *self.shape[1:]),
            self.block_size,
            self.scale_kind,
            self.tensor_scale,
        )

    def to(self, device) -> FP4Weights:
        return FP4Weights(
            self.packed.to(device),
            self.scales.to(device),
            self.shape,
            self.block_size,
            self.scale_kind,
            None if self.tensor_scale is None else self.tensor_scale.to(device),
        )

    def linear_scales(self) -> torch.Tensor:
        """fp32 multiplier per block (E8M0 decoded, or E4M3 x tensor scale) — what the kernels read for NVFP4."""
        if self.scale_kind == "e8m0":
            return e8m0_to_float(self.scales)
        return self.scales.float() * self.tensor_scale


def quantize(w: torch.Tensor, fmt: str) -> FP4Weights:
    return FP4Weights.quantize(w, fmt)
