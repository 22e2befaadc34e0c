"""Per-kernel breakdown of one MoE block fwd+bwd (torch.profiler) and the tiles each launch used.

Usage: python bench/profile_block.py [shape ...]   (shapes from bench_moe_block.SHAPES; the plugin's env switches,
e.g. SCATTERMOE_CUDA_GRAPH=1 or SCATTERMOE_FUSED_GATES=0, apply)
"""

from __future__ import annotations

import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_moe_block import SHAPES, build_block  # noqa: E402


def main(names):
    from host_plugin_scattermoe import experts, kernels, lora

    experts.register()
    for name in names:
        family, E, H, I, k = SHAPES[name]
        holder, cfg = build_block(family, E, H, I, k, 16)
        lora.attach(holder)
        cfg._experts_implementation = "scattermoe"
        x = torch.randn(1, 4096, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn_like(x)

        params = [p for p in holder.parameters() if p.requires_grad]

        def step():
            x.grad = None  # as a training step after zero_grad(set_to_none): no gradient-accumulation adds in the table
            for p in params:
                p.grad = None
            out = holder.mlp(x)
            out = out[0] if isinstance(out, tuple) else out
            out.backward(g)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU],
                                    record_shapes=True) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        print(f"===== {name} (5 steps; GPU ms per step, launches per step, kernel)")
        evs = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)
        total = sum(e.self_device_time_total for e in evs) / 5 / 1e3
        for ev in evs[:24]:
            if ev.self_device_time_total > 0:
                print(f"{ev.self_device_time_total / 5 / 1e3:8.3f} {ev.count // 5:4d}x  {ev.key[:100]}")
        print(f"{total:8.3f}  total")
        print(f"----- {name}: torch ops with GPU time, by input shapes (ms per step, calls per step)")
        ops = [e for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith("aten::") and e.self_device_time_total > 0]
        for ev in sorted(ops, key=lambda e: -e.self_device_time_total)[:30]:
            print(f"{ev.self_device_time_total / 5 / 1e3:8.3f} {ev.count // 5:4d}x  {ev.key[:28]:28s} {str(ev.input_shapes)[:110]}")
        for key, conf in kernels._PICKED.items():
            print(key, conf)
        kernels._PICKED.clear()
        del holder, x, g


if __name__ == "__main__":
    main(sys.argv[1:] or ["Qwen3-30B-A3B", "Mixtral-8x7B"])
