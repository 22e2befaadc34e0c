"""Gemma 4 plugin benchmark (one GPU): per-step memory under checkpointing with/without the plugin,
step time with/without the fused kernel, and the kernel alone vs eager and torch.compile.

Usage: python plugins/gemma4/bench/bench_gemma4.py [--out DIR] [--steps 50] [--seq 4096] [--smoke]
(--smoke: tiny shapes on CPU, to check the script). Prints a markdown table last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402


def bench_ms(fn, device, reps=50):
    if str(device).startswith("cuda"):
        from triton.testing import do_bench

        return do_bench(fn, warmup=10, rep=reps)
    import time

    fn()
    t = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - t) / 3 * 1e3


def kernel_rows(device, smoke):
    from host_plugin_gemma4.rms_norm_rope import eager_rms_norm_rope, fused_rms_norm_rope

    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    S = 64 if smoke else 4096
    shapes = [("q sliding", 8, 256, True, True), ("k sliding", 2, 256, True, True),
              ("q global", 8, 512, True, True), ("v (no scale, no rope)", 2, 256, False, False)]
    if smoke:
        shapes = [(n, h, d // 16, w, r) for n, h, d, w, r in shapes]
    compiled = torch.compile(eager_rms_norm_rope, dynamic=False) if not smoke else None
    rows = []
    for name, H, D, has_w, rope in shapes:
        x = torch.randn(1, S, H, D, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(D, device=device, dtype=dtype).mul_(0.1).add_(1).requires_grad_() if has_w else None
        ang = torch.randn(1, S, D, device=device)
        cos, sin = (ang.cos().to(dtype), ang.sin().to(dtype)) if rope else (None, None)
        g = torch.randn_like(x)
        res = {"op": f"{name} [1,{S},{H},{D}]"}
        impls = {"fused": fused_rms_norm_rope, "eager": eager_rms_norm_rope}
        if compiled is not None and name.startswith("q"):  # compile time: the two q shapes only
            impls["compile"] = compiled
        for key, fn in impls.items():
            def fwd(fn=fn):
                with torch.no_grad():
                    fn(x, w, cos, sin)

            def fwdbwd(fn=fn):
                y = fn(x, w, cos, sin)
                y.backward(g)

            res[f"{key} fwd ms"] = bench_ms(fwd, device)
            res[f"{key} fwd+bwd ms"] = bench_ms(fwdbwd, device)
        rows.append(res)
    return rows


def memory_runs(device, smoke, steps, seq):
    import host_plugin_gemma4 as plugin
    from host_plugin_gemma4 import shared_kv

    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    vocab = 512 if smoke else 32768
    out = {}
    for label, with_plugin in (("without plugin", False), ("with plugin", True)):
        m = common.build(smoke, device, dtype, vocab=vocab)
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
        if with_plugin:
            plugin.post_model_build(cfg=common.plugin_cfg(gemma4_fix_logged_loss=False, gemma4_shared_kv_side_channel=True), model=m)
        stats = common.train_steps(m, steps, seq, device, vocab)
        out[label] = stats
        if with_plugin:
            shared_kv.uninstall(m)
        del m
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
    return out


def step_time_runs(device, smoke, seq, steps=10):
    import host_plugin_gemma4 as plugin

    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    vocab = 512 if smoke else 32768
    res = {}
    for label, fused in (("eager norm+rope", False), ("fused kernel", True)):
        m = common.build(smoke, device, dtype, vocab=vocab)
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
        plugin.post_model_build(cfg=common.plugin_cfg(gemma4_fused_norm_rope=fused, gemma4_fix_logged_loss=False), model=m)
        common.train_steps(m, 3, seq, device, vocab)  # warmup (autotune, allocator)
        stats = common.train_steps(m, steps, seq, device, vocab)
        ms = sorted(s[2] for s in stats)[len(stats) // 2]
        res[label] = {"median_step_ms": ms, "peak_GiB": max(s[1] for s in stats)}
        del m
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if a.smoke or not torch.cuda.is_available() else "cuda:0"
    seq = 32 if a.smoke else a.seq
    steps = min(a.steps, 6) if a.smoke else a.steps
    import transformers

    meta = {"device": torch.cuda.get_device_name(0) if device != "cpu" else "cpu", "date": str(datetime.date.today()),
            "torch": torch.__version__, "transformers": transformers.__version__, "seq": seq, "steps": steps,
            "model": "smoke" if a.smoke else common.REAL}
    results = {"meta": meta}
    for name, fn in (("kernel", lambda: kernel_rows(device, a.smoke)),
                     ("memory", lambda: memory_runs(device, a.smoke, steps, seq)),
                     ("step_time", lambda: step_time_runs(device, a.smoke, seq))):
        try:
            results[name] = fn()
        except Exception as exc:  # keep the other sections' numbers
            import traceback

            traceback.print_exc()
            results[name] = {"error": repr(exc)}
        (out / "bench_gemma4.json").write_text(json.dumps(results, indent=1, default=str))

    print(f"\n## Gemma 4 plugin benchmark — {meta['device']}, {meta['date']}, torch {meta['torch']}, "
          f"transformers {meta['transformers']}, seq {seq}, bf16")
    mem_res = results.get("memory", {})
    if "error" not in mem_res:
        print("\n| run (50 checkpointed steps) | alloc after step 1 GiB | after last GiB | growth GiB/step | peak in step GiB |")
        print("|---|---|---|---|---|")
        for label, stats in mem_res.items():
            after = [s[0] for s in stats]
            print(f"| {label} | {after[0]:.3f} | {after[-1]:.3f} | {common.slope(after[1:]):+.5f} | {max(s[1] for s in stats):.3f} |")
    st = results.get("step_time", {})
    if "error" not in st:
        print("\n| training step (checkpointed, fwd+bwd+SGD) | median ms | peak GiB |")
        print("|---|---|---|")
        for label, r in st.items():
            print(f"| {label} | {r['median_step_ms']:.1f} | {r['peak_GiB']:.2f} |")
    kr = results.get("kernel", [])
    if isinstance(kr, list) and kr:
        keys = list(dict.fromkeys(k for r in kr for k in r if k != "op"))
        print("\n| kernel | " + " | ".join(keys) + " |")
        print("|---|" + "---|" * len(keys))
        for r in kr:
            print(f"| {r['op']} | " + " | ".join(f"{r[k]:.3f}" if k in r else "-" for k in keys) + " |")


if __name__ == "__main__":
    main()
