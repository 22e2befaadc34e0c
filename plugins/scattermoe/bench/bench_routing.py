"""``routing.sort_tokens``: the torch path (stable ``torch.sort`` + ``searchsorted``) against the Triton counting sort
(``routing_kernels``), per call, on one GPU.

Per (N = T·k, E) and path: ``host`` = host µs to enqueue one call (no synchronisation inside a round of calls, best of
rounds), ``gpu`` = device µs per call (20 calls captured in one CUDA graph, replayed: no host in it), ``sync`` = µs of
one call followed by a synchronisation (median; what a synchronised step pays), and ``launches`` (kernels per call,
from the profiler). ``--sweep`` adds the Triton variants (chunk size, scan, rank) at each size, GPU µs only, each
checked equal to the torch path. The table is printed last; JSON to ``--json`` (default ``$OUT/bench_routing.json``).

Usage: python bench/bench_routing.py [--sizes 32768:128 32768:256 32768:64 262144:128] [--sweep]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from host_overhead import per_call_us  # noqa: E402


def sync_us(fn, n=50):
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(ts)


def gpu_us(fn, reps=20, replays=10):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(replays):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / replays / reps * 1e3


def launches(fn):
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(ev.count for ev in prof.key_averages()
                   if getattr(ev, "device_type", None) == torch.autograd.DeviceType.CUDA)
    except Exception:  # noqa: BLE001 - a profiler that cannot run here: no count
        return None


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="*", default=["32768:128", "32768:256", "32768:64", "262144:128", "4096:128",
                                                   "4194304:512"])
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--json", default=os.environ.get("OUT", ".") + "/bench_routing.json")
    args = ap.parse_args()
    from host_plugin_scattermoe import routing
    from host_plugin_scattermoe import routing_kernels as RK

    dev = torch.cuda.get_device_name()
    rows = []
    for spec in args.sizes:
        N, E = (int(v) for v in spec.split(":"))
        T = max(1, N // args.k)
        g = torch.Generator(device="cuda").manual_seed(0)
        idx = torch.randn(T, E, device="cuda", generator=g).topk(args.k, dim=1).indices
        ref = routing.sort_tokens_torch(idx, E)
        paths = {"torch": lambda: routing.sort_tokens_torch(idx, E), "triton": lambda: routing.sort_tokens(idx, E)}
        routing.TRITON = True
        ok = same(routing.sort_tokens(idx, E), ref)
        for name, fn in paths.items():
            fn()
            row = dict(N=T * args.k, E=E, path=name, variant="rule" if name == "triton" else "-",
                       host=per_call_us(fn, n=50), gpu=gpu_us(fn), sync=sync_us(fn), launches=launches(fn),
                       equal=True if name == "torch" else ok)
            rows.append(row)
            print(json.dumps(row), flush=True)
        if args.sweep:
            flat = idx.reshape(-1)
            for block in (256, 512, 1024, 2048, 4096):
                C = -(-flat.numel() // block)
                BP = 1 << (E + 1).bit_length()
                for scan in ((0,) if C == 1 else (1, 2) if C * BP <= (1 << 18) else (2,)):
                    for rank in (0, 1) if block <= 256 else (0,):
                        fn = lambda: RK.route_sort(flat, E, block=block, scan=scan, rank=rank)  # noqa: E731
                        try:
                            eq = same(fn(), ref)
                            row = dict(N=flat.numel(), E=E, path="triton", variant=f"b{block} s{scan} r{rank}",
                                       host=None, gpu=gpu_us(fn), sync=None, launches=None, equal=eq)
                        except Exception as exc:  # noqa: BLE001 - a variant that does not compile is reported
                            print(f"N={flat.numel()} E={E} b{block} s{scan} r{rank} failed: {exc!r}"[:300], flush=True)
                            continue
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    with open(args.json, "w") as f:
        json.dump({"device": dev, "date": datetime.date.today().isoformat(), "torch": torch.__version__, "rows": rows},
                  f, indent=1)
    fmt = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    print(f"\nsort_tokens per call, {dev}, k={args.k}, us (host: enqueue; gpu: graph replay; sync: call + sync)")
    print(f"{'N':>8}{'E':>5} {'path':<7}{'variant':<14}{'host':>7}{'gpu':>7}{'sync':>7}{'kern':>5} equal")
    for r in rows:
        if r["variant"] in ("rule", "-"):
            print(f"{r['N']:>8}{r['E']:>5} {r['path']:<7}{r['variant']:<14}{fmt(r['host']):>7}{fmt(r['gpu']):>7}"
                  f"{fmt(r['sync']):>7}{fmt(r['launches'], 0):>5} {r['equal']}")
    best = {}
    for r in rows:
        if r["variant"] not in ("rule", "-") and r["equal"]:
            k = (r["N"], r["E"])
            if k not in best or r["gpu"] < best[k]["gpu"]:
                best[k] = r
    for (n, e), r in best.items():
        print(f"{n:>8}{e:>5} sweep best: {r['variant']:<14} gpu {r['gpu']:.1f} us")
    if not all(r["equal"] for r in rows):
        print("MISMATCH against the torch path:", [(r["N"], r["E"], r["variant"]) for r in rows if not r["equal"]])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
