"""Dequantize-kernel tile sweep on the GPU (one process; prints a table, writes JSON to $OUT).

Strategy A's cost over scattermoe bf16 is this kernel (4.25 bits read, 16 written per weight), so its
bandwidth decides A's ratio. For each expert shape (Qwen3-30B-A3B, Qwen3.5-35B-A3B, gpt-oss-20b's
transposed layout) and each tile ``(BLOCK_R, BLOCK_KB, num_warps)``: median time (``do_bench``),
bytes moved / time, and the output bitwise equal to v0's (random bytes and every E8M0 scale byte;
tests/test_mxfp4_gpu.py checks the library kernel against the torch decode). v0 and v1 are the
kernels before this sweep (bench-only copies). Also the device-to-device copy rate as the ceiling.

Usage: python plugins/mxfp4/bench/sweep_dequant.py
"""

from __future__ import annotations

import json
import os

import torch
import triton

import triton.language as tl

from host_plugin_mxfp4 import kernels
from host_plugin_mxfp4.formats import FP4Weights
from host_plugin_mxfp4.kernels import _load_scales


@triton.jit
def _old_decode_e2m1(code):
    """The decode before this sweep: exponent and mantissa taken apart, subnormal selected."""
    mag = code & 7
    e = mag >> 1
    m = mag & 1
    normal = ((e + 126) << 23) | (m << 22)
    sub = m * (126 << 23)
    bits = tl.where(e == 0, sub, normal) | ((code & 8) << 28)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dequant_old(Wq, Sc, Out, R, N, KB, s_oe, s_on, s_ok, SCALE_KIND: tl.constexpr, HALF_BLOCK: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_KB: tl.constexpr, BROADCAST_SCALES: tl.constexpr):
    """Earlier kernels, for the before/after rows: v0 gathers one scale per byte (BROADCAST_SCALES=0),
    v1 loads each scale once per tile; both decode with ``_old_decode_e2m1``."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    j = (tl.program_id(1) * BLOCK_KB + tl.arange(0, BLOCK_KB)).to(tl.int64)
    mask = (rows < R)[:, None] & (j < KB)[None, :]
    byte = tl.load(Wq + rows[:, None] * KB + j[None, :], mask=mask, other=0).to(tl.int32)
    if BROADCAST_SCALES:
        NB: tl.constexpr = BLOCK_KB // HALF_BLOCK
        sb = tl.program_id(1) * NB + tl.arange(0, NB)
        smask = (rows < R)[:, None] & (sb < KB // HALF_BLOCK)[None, :]
        sc = _load_scales(Sc + rows[:, None] * (KB // HALF_BLOCK) + sb[None, :], smask, SCALE_KIND)
        scale = tl.reshape(tl.broadcast_to(sc[:, :, None], (BLOCK_R, NB, HALF_BLOCK)), (BLOCK_R, BLOCK_KB))
    else:
        scale = _load_scales(Sc + rows[:, None] * (KB // HALF_BLOCK) + (j // HALF_BLOCK)[None, :], mask, SCALE_KIND)
    ty = Out.dtype.element_ty
    vals = tl.interleave((_old_decode_e2m1(byte & 15) * scale).to(ty), (_old_decode_e2m1(byte >> 4) * scale).to(ty))
    kk = (tl.program_id(1) * (2 * BLOCK_KB) + tl.arange(0, 2 * BLOCK_KB)).to(tl.int64)
    base = (rows // N) * s_oe + (rows % N) * s_on
    kmask = (rows < R)[:, None] & (kk < 2 * KB)[None, :]
    tl.store(Out + base[:, None] + kk[None, :] * s_ok, vals, mask=kmask)


def dequant_old(w, out, broadcast):
    N, KB = w.packed.shape[-2], w.packed.shape[-1]
    R = w.packed.numel() // KB
    grid = (triton.cdiv(R, 32), triton.cdiv(KB, 64))
    _dequant_old[grid](w.packed, w.scales, out, R, N, KB, out.stride(0), out.stride(1), out.stride(2),
                       SCALE_KIND=0, HALF_BLOCK=16, BLOCK_R=32, BLOCK_KB=64, BROADCAST_SCALES=broadcast)
    return out


SHAPES = {  # name: ([E, N, K] of the container, k_major)
    "Qwen3.5 gate_up [256,1024,2048]": ((256, 1024, 2048), False),
    "Qwen3.5 down [256,2048,512]": ((256, 2048, 512), False),
    "Qwen3-30B gate_up [128,1536,2048]": ((128, 1536, 2048), False),
    "Qwen3-30B down [128,2048,768]": ((128, 2048, 768), False),
    "gpt-oss gate_up k-major [32,5760,2880]": ((32, 5760, 2880), True),
}
TILES = ["v0 (32, 64, 4)", "v1 (32, 64, 4)", (32, 64, 4), (16, 128, 4), (8, 128, 4), (8, 256, 4), (16, 256, 8), (64, 128, 8)]


def random_container(shape):
    E, N, K = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    packed = torch.randint(0, 256, (E, N, K // 2), generator=g, device="cuda", dtype=torch.uint8)
    scales = torch.randint(0, 256, (E, N, K // 32), generator=g, device="cuda", dtype=torch.uint8)  # every E8M0 byte, NaN too
    return FP4Weights(packed, scales, shape, 32, "e8m0")


def main():
    out_dir = os.environ.get("OUT", "/tmp/mxfp4_sweep")
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=10, rep=50, return_mode="median")
    copy_tbs = 2 * a.numel() / ms / 1e9
    del a, b
    print(f"device-to-device copy: {copy_tbs:.2f} TB/s", flush=True)
    for name, (shape, k_major) in SHAPES.items():
        w = random_container(shape)
        nbytes = w.nbytes + 2 * shape[0] * shape[1] * shape[2]
        ref = None
        for tile in TILES:
            out = w.empty_dequantized(torch.bfloat16, k_major)
            if isinstance(tile, str):
                run = lambda: dequant_old(w, out, tile.startswith("v1"))  # noqa: E731
            else:
                run = lambda: kernels.dequantize(w, out, tile=tile)  # noqa: E731
            try:
                run()
                same = True if ref is None else bool(torch.equal(out.view(torch.int16), ref.view(torch.int16)))
                if ref is None:
                    ref = out.clone()
                ms = triton.testing.do_bench(run, warmup=10, rep=50, return_mode="median")
                rows.append(dict(shape=name, tile=tile, ms=ms, tbs=nbytes / ms / 1e9, bitwise=same))
            except Exception as exc:  # a tile that does not compile here
                rows.append(dict(shape=name, tile=tile, ms=None, error=repr(exc)[:200]))
            print(rows[-1], flush=True)
        del w, ref
        torch.cuda.empty_cache()
    best = {}
    for order, k_major in (("k_contiguous", False), ("k_major", True)):
        names = [n for n, (_, km) in SHAPES.items() if km == k_major]
        total = {}
        for t in TILES:
            ms = [r["ms"] for r in rows if r["shape"] in names and r["tile"] == t and r.get("ms") and r.get("bitwise")]
            if len(ms) == len(names) and not isinstance(t, str):
                total[t] = sum(ms)
        if total:
            best[order] = list(min(total, key=total.get))
    print("best tiles (sum of ms over the shapes of that order):", best)
    json.dump({"device": torch.cuda.get_device_name(), "copy_tbs": copy_tbs, "rows": rows, "best": best},
              open(os.path.join(out_dir, "sweep_dequant.json"), "w"), indent=1)
    print(f"\n{torch.cuda.get_device_name()}: copy {copy_tbs:.2f} TB/s\n| shape | tile (R, KB, warps) | ms | TB/s | bitwise |")
    print("| --- | --- | ---: | ---: | --- |")
    for r in rows:
        if r.get("ms") is None:
            print(f"| {r['shape']} | {r['tile']} | fail | - | - |")
        else:
            print(f"| {r['shape']} | {r['tile']} | {r['ms']:.3f} | {r['tbs']:.2f} | {r['bitwise']} |")
    for name in SHAPES:
        ok = [r for r in rows if r["shape"] == name and r.get("ms") is not None]
        if not ok:
            continue
        top = min(ok, key=lambda r: r["ms"])
        print(f"fastest at {name}: {top['tile']} {top['ms']:.3f} ms {top['tbs']:.2f} TB/s")


if __name__ == "__main__":
    main()
