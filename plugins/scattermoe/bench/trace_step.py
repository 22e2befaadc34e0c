"""Where a synchronised block step waits: every kernel's host launch time against its GPU start, one step at a time.

``bench_moe_block.py``'s ``ms`` (the issue's figure) is the GPU time of a synchronised step plus every stretch in
which the GPU waits for the host. This traces a few such steps (torch.profiler, CPU + CUDA) and lines each kernel's
launch on the host up with its start on the GPU. Where the GPU starts a kernel within a few µs of its launch, the
host is the bottleneck there; the rows say which host work (router, experts forward, which backward node) sat in
between. Printed per implementation: one step's kernel table, the idle stretches and their host work, the summary
(host enqueue, GPU busy, GPU idle inside the step), and the top host ops by self time. JSON and the chrome trace of
the last implementation go to ``--out``.

Usage: python bench/trace_step.py [--shape Qwen3-30B-A3B] [--impls scattermoe scattermoe+graph] [--out DIR]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _annotate(module, label):
    """Wrap ``module.forward`` in a profiler range (host side: what the router / experts cost to enqueue)."""
    fwd = module.forward

    def forward(*a, **kw):
        with torch.profiler.record_function(label):
            return fwd(*a, **kw)

    module.forward = forward


def _container(intervals, t):
    """Innermost and backward-node ranges of one thread that contain host time ``t``."""
    inner, node = None, None
    for ts, end, name in intervals:
        if ts > t:
            break
        if end >= t:
            if inner is None or end - ts <= inner[1] - inner[0]:
                inner = (ts, end, name)
            if name.startswith("autograd::engine::evaluate_function") or name in ("router", "experts", "block"):
                if node is None or end - ts <= node[1] - node[0]:
                    node = (ts, end, name)
    short = lambda x: None if x is None else x[2].replace("autograd::engine::evaluate_function: ", "bwd:")  # noqa: E731
    return short(inner), short(node)


def analyse(trace: dict, steps: list[str]) -> list[dict]:
    ev = trace["traceEvents"]
    by_corr_launch = {}
    ranges: dict = {}
    kernels = []
    ann = {}
    for e in ev:
        cat = e.get("cat", "")
        if e.get("ph") != "X":
            continue
        if cat == "cuda_runtime" or cat == "cuda_driver":
            c = e.get("args", {}).get("correlation")
            if c is not None:
                by_corr_launch[c] = e
        elif cat in ("kernel", "gpu_memcpy", "gpu_memset"):
            kernels.append(e)
        elif cat in ("cpu_op", "user_annotation"):
            ranges.setdefault(e["tid"], []).append((e["ts"], e["ts"] + e["dur"], e["name"]))
            if e["name"] in steps and cat == "user_annotation":
                ann[e["name"]] = e
    for v in ranges.values():
        v.sort()
    kernels.sort(key=lambda e: e["ts"])
    out = []
    starts = sorted(a["ts"] for a in ann.values()) + [float("inf")]
    for name in steps:
        a = ann.get(name)
        if a is None:
            continue
        t0 = a["ts"]
        t_next = starts[starts.index(t0) + 1]  # steps are synchronised: a step's kernels are launched before the next
        rows = []
        for k in kernels:
            lau = by_corr_launch.get(k.get("args", {}).get("correlation"))
            if lau is None or not (t0 <= lau["ts"] < t_next):
                continue
            if lau["ts"] > t0 + a["dur"] and lau["tid"] == a["tid"]:
                continue  # launched by the caller after the step returned (the next step's zero())
            inner, node = _container(ranges.get(lau["tid"], []), lau["ts"])
            rows.append(dict(kernel=k["name"][:60], launch=lau["ts"] - t0, start=k["ts"] - t0, dur=k["dur"],
                             op=inner, node=node, tid=lau["tid"]))
        rows.sort(key=lambda r: r["start"])
        busy, idle, prev_end, gaps = 0.0, 0.0, 0.0, []
        for r in rows:
            gap = r["start"] - prev_end
            r["gap"] = gap
            if gap > 0:
                idle += gap
                if gap > 4:
                    gaps.append(r)
            busy += r["dur"]
            prev_end = max(prev_end, r["start"] + r["dur"])
        out.append(dict(step=name, host_us=a["dur"], gpu_end_us=prev_end, busy_us=busy, idle_us=idle, rows=rows,
                        gaps=[dict(before=g["kernel"], gap=g["gap"], op=g["op"], node=g["node"]) for g in gaps]))
    return out


def print_step(res: dict, impl: str):
    print(f"\n=== {impl} {res['step']}: host enqueue {res['host_us']:.0f} us, GPU done at {res['gpu_end_us']:.0f} us, "
          f"GPU busy {res['busy_us']:.0f} us, GPU idle {res['idle_us']:.0f} us (incl. before the first kernel)")
    print(f"{'launch':>8}{'start':>8}{'wait':>7}{'dur':>7}  {'kernel':<44}{'host op':<36}node")
    for r in res["rows"]:
        print(f"{r['launch']:>8.0f}{r['start']:>8.0f}{r['gap']:>7.0f}{r['dur']:>7.0f}  {r['kernel'][:43]:<44}"
              f"{str(r['op'])[:35]:<36}{str(r['node'])[:40]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="Qwen3-30B-A3B")
    ap.add_argument("--impls", nargs="*", default=["scattermoe", "scattermoe+graph"])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    from bench_moe_block import SHAPES, build_block

    from host_plugin_scattermoe import experts, graphs, lora, ops, router

    experts.register()
    family, E, H, I, k = SHAPES[args.shape]
    summary, trace = [], None
    for impl in args.impls:
        holder, cfg = build_block(family, E, H, I, k, args.rank, lora=True)
        if impl.startswith("scattermoe"):
            lora.attach(holder)
            router.install(holder)
            graphs.install(holder)
        ops.SETTINGS["cuda_graph"] = impl == "scattermoe+graph"
        ops.SETTINGS["fused_router"] = impl != "scattermoe+torchrouter"
        cfg._experts_implementation = impl.split("+")[0]
        mlp = holder.mlp
        gate = getattr(mlp, "gate", None) or getattr(mlp, "router", None)
        if gate is not None:
            _annotate(gate, "router")
        _annotate(mlp.experts, "experts")
        lparams = [p for p in holder.parameters() if p.requires_grad]
        torch.manual_seed(1)
        x = torch.randn(1, args.tokens, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        gout = torch.randn(1, args.tokens, H, device="cuda", dtype=torch.bfloat16)

        def step():
            out = mlp(x)
            out = out[0] if isinstance(out, tuple) else out
            out.backward(gout)

        def zero():
            x.grad = None
            for p in lparams:
                p.grad = None

        for _ in range(6):
            zero()
            step()
        torch.cuda.synchronize()
        names = [f"step{i}" for i in range(args.steps)]
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            for n in names:
                zero()
                torch.cuda.synchronize()
                with torch.profiler.record_function(n):
                    step()
                torch.cuda.synchronize()
        path = os.path.join(args.out, f"trace_{args.shape}_{impl}.json")
        prof.export_chrome_trace(path)
        trace = json.load(open(path))
        res = analyse(trace, names)
        with gzip.open(path + ".gz", "wt") as f:
            json.dump(trace, f)
        os.remove(path)
        mid = res[len(res) // 2]
        print_step(mid, impl)
        print(f"--- {impl}: GPU waits > 4 us (kernel after the wait, host op that launched it)")
        for g in mid["gaps"]:
            print(f"  {g['gap']:>7.0f} us  before {g['before'][:40]:<42}{str(g['op'])[:40]:<42}{g['node']}")
        print(f"--- {impl}: top host ops by self CPU time, us per step")
        ka = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:25]
        for e in ka:
            print(f"  {e.self_cpu_time_total / args.steps:>8.1f}  {e.count / args.steps:>5.1f}x  {e.key[:90]}")
        for r in res:
            summary.append(dict(impl=impl, step=r["step"], host_us=r["host_us"], gpu_end_us=r["gpu_end_us"],
                                busy_us=r["busy_us"], idle_us=r["idle_us"], kernels=len(r["rows"])))
        with open(os.path.join(args.out, f"trace_step_{args.shape}_{impl}.json"), "w") as f:
            json.dump(res, f)
        del holder, x, gout, mlp
        torch.cuda.empty_cache()
    print(f"\ndevice: {torch.cuda.get_device_name()}  shape {args.shape} T={args.tokens} r={args.rank}, us per synchronised step")
    print(f"{'impl':<20}{'step':<7}{'host':>8}{'gpu end':>9}{'busy':>8}{'idle':>8}{'kernels':>9}")
    for s in summary:
        print(f"{s['impl']:<20}{s['step']:<7}{s['host_us']:>8.0f}{s['gpu_end_us']:>9.0f}{s['busy_us']:>8.0f}"
              f"{s['idle_us']:>8.0f}{s['kernels']:>9}")


if __name__ == "__main__":
    main()
