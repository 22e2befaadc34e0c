"""The LoRA factor ``lora_B``'s re-layout per experts call, torch's copy vs the tiled Triton transpose (relayout.py).

Forward: peft's ``lora_B`` ``[out, r·E]`` (kernel view ``B [E, out, r]``, ``E`` innermost) → ``[E, r, out]`` in the
model's dtype (bf16): torch = ``B.transpose(1, 2).to(bf16, memory_format=contiguous).contiguous()`` (``ops.kernel_lora`` with
``SCATTERMOE_TILED_RELAYOUT=0``), tiled = ``relayout.kernel_B``. Backward: ``dB`` as ``group_outer`` writes it
(contiguous ``[E, out, r]``, bf16) → the parameter's layout and dtype: torch = what the engine did (the cast, then the
reshape's clone into ``[out, r·E]``), tiled = ``relayout.grad_like``. Factors in bf16 (the model's dtype) and fp32
(peft's autocast of adapters). Times: ``triton.testing.do_bench`` medians (µs), and the bytes moved / time.

Usage: python bench/bench_relayout.py [--json PATH]   (table printed last; JSON to $OUT or --json)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

import torch
import triton

from host_plugin_scattermoe import relayout

SHAPES = {  # name: (E, H, I)
    "Qwen3-30B-A3B": (128, 2048, 768),
    "Qwen3.5-35B-A3B": (256, 2048, 512),
    "gpt-oss-20b": (32, 2880, 2880),
    "Mixtral-8x7B": (8, 4096, 14336),
}


def us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--json", default=os.environ.get("OUT", ".") + "/bench_relayout.json")
    args = ap.parse_args()
    r, dt = args.rank, torch.bfloat16
    rows = []
    for name in args.shapes:
        E, H, I = SHAPES[name]
        for proj, out in (("gate_up", 2 * I), ("down", H)):
            for fdt in (torch.bfloat16, torch.float32):
                wb = torch.randn(out, r * E, device="cuda", dtype=fdt)
                B = wb.view(out, r, E).permute(2, 0, 1)
                dBk = torch.randn(E, out, r, device="cuda", dtype=dt)
                want_f = B.transpose(1, 2).to(dt, memory_format=torch.contiguous_format).contiguous().transpose(1, 2)
                got_f = relayout.kernel_B(B, dt)
                want_b = dBk.to(fdt).permute(1, 2, 0).reshape(out, r * E)
                got_b = relayout.grad_like(dBk, fdt, B.shape, B.stride())
                ok = torch.equal(got_f, want_f) and torch.equal(got_b.permute(1, 2, 0).reshape(out, r * E), want_b)
                nbytes_f = wb.numel() * (fdt.itemsize + dt.itemsize)
                t = {
                    "fwd torch": us(lambda: B.transpose(1, 2).to(dt, memory_format=torch.contiguous_format).contiguous()),
                    "fwd tiled": us(lambda: relayout.kernel_B(B, dt)),
                    "bwd torch": us(lambda: dBk.to(fdt).permute(1, 2, 0).reshape(out, r * E)),
                    "bwd tiled": us(lambda: relayout.grad_like(dBk, fdt, B.shape, B.stride())),
                }
                row = dict(shape=name, proj=proj, E=E, out=out, r=r, factor_dtype=str(fdt)[6:], elems=wb.numel(),
                           bitwise=ok, **{k.replace(" ", "_") + "_us": v for k, v in t.items()},
                           gbps_tiled_fwd=nbytes_f / t["fwd tiled"] / 1e3, gbps_tiled_bwd=nbytes_f / t["bwd tiled"] / 1e3)
                rows.append(row)
                del wb, B, dBk, want_f, got_f, want_b, got_b
    dev = torch.cuda.get_device_name()
    with open(args.json, "w") as f:
        json.dump({"device": dev, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                   "triton": triton.__version__, "rows": rows}, f, indent=1)
    print(f"device: {dev}  lora_B re-layout per call, r={r}, model bf16; µs (do_bench median), GB/s of the tiled kernel")
    print(f"{'shape':<16}{'proj':<8}{'factor':<9}{'Melem':>6}{'fwd torch':>10}{'tiled':>7}{'GB/s':>6}"
          f"{'bwd torch':>10}{'tiled':>7}{'GB/s':>6}  bitwise")
    for x in rows:
        print(f"{x['shape']:<16}{x['proj']:<8}{x['factor_dtype']:<9}{x['elems'] / 1e6:>6.2f}{x['fwd_torch_us']:>10.1f}"
              f"{x['fwd_tiled_us']:>7.1f}{x['gbps_tiled_fwd']:>6.0f}{x['bwd_torch_us']:>10.1f}{x['bwd_tiled_us']:>7.1f}"
              f"{x['gbps_tiled_bwd']:>6.0f}  {x['bitwise']}")
    return 0 if all(x["bitwise"] for x in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
