"""Where strategy A's time goes at one real shape: each piece of ``selective_forward`` timed alone
(``bench_mxfp4.bench``: median of CUDA-event timings), then a torch.profiler table of one fwd+bwd
step (top kernels by GPU time).

    python plugins/mxfp4/bench/profile_selective.py [--shape Qwen3-30B-A3B] [--strategy selective]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_mxfp4 as bm  # noqa: E402


def timed(fn, iters=10):
    """Median ms of ``fn`` (the benchmark's own timer)."""
    return bm.bench(fn, iters)[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="Qwen3-30B-A3B")
    ap.add_argument("--strategy", default="selective")
    a = ap.parse_args()
    from host_plugin_scattermoe import experts as sm_experts

    from host_plugin_mxfp4 import experts as fp4_experts
    from host_plugin_mxfp4 import loading

    spec = bm.SHAPES[a.shape]
    sm_experts.register()
    ex = bm.make_experts(**spec)
    block = bm.add_lora(bm.Block(ex))
    g = torch.Generator(device="cuda").manual_seed(2)
    x0 = torch.randn(bm.T_TOKENS, spec["H"], generator=g, device="cuda").to(torch.bfloat16)
    dy = torch.randn_like(x0)
    idx, w = bm.routing(bm.T_TOKENS, spec["E"], spec["k"], "balanced")
    loading.quantize_module(ex, "mxfp4")
    fp4_experts.install(block)
    fp4_experts.SETTINGS["strategy"] = a.strategy
    step = bm.step_fn(block, x0, idx, w, dy)

    rows = [("full step fwd+bwd", timed(step))]
    with torch.no_grad():
        rows.append(("forward only (no grad)", timed(lambda: block.experts(x0, idx, w))))
    active = torch.unique(idx.reshape(-1))
    rows.append(("torch.unique", timed(lambda: torch.unique(idx.reshape(-1)))))
    tr = loading.is_transposed(ex)
    for name in loading.quantized_names(ex):
        W = loading.get_weights(ex, name)
        rows.append((f"{name}: get_weights", timed(lambda: loading.get_weights(ex, name))))
        rows.append((f"{name}: select(active)", timed(lambda: W.select(active))))
        sel = W.select(active)
        rows.append((f"{name}: dequantize {tuple(sel.shape)} k_major={tr}", timed(lambda: sel.dequantize(torch.bfloat16, k_major=tr))))
        rows.append((f"{name}: dequantize k_major={not tr}", timed(lambda: sel.dequantize(torch.bfloat16, k_major=not tr))))
    print(f"\n{torch.cuda.get_device_name()}, {a.shape} {spec}, T={bm.T_TOKENS}, strategy {a.strategy}")
    for n, ms in rows:
        print(f"| {n} | {ms:.3f} ms |")

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    for key, n in (("self_device_time_total", 22), ("cpu_time_total", 12)):
        try:
            print(prof.key_averages().table(sort_by=key, row_limit=n, max_name_column_width=60))
        except Exception as exc:  # older/newer profiler key names
            print(f"(profiler table by {key} failed: {exc})")


if __name__ == "__main__":
    main()
