"""Time every candidate tile of every Triton launch in one MoE block step, per shape.

For each benchmark shape (``bench_moe_block.SHAPES``, T tokens, LoRA r=16, bf16) one forward+backward
step of the block is run with the launchers wrapped, so each ``scatter2scatter`` / ``group_outer``
call of the step is recorded with its real operands. Every candidate configuration of each recorded
call is then compiled (in parallel worker processes that share Triton's on-disk cache: compiling is
the slow part) and timed alone (``triton.testing.do_bench``, median, L2 flushed between reps).
Prints per launch: the best tile, its ms, the rule's pick and its ms, the spread; then the best tile per launch (what ``kernels.s2s_rule`` / ``outer_rule`` were fitted to). JSON to $OUT.

Usage: python bench/tune_tiles.py [--shapes Qwen3-30B-A3B ...] [--tokens 4096] [--workers 14]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _c(bm, bn, bk, g, w, s):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g, "num_warps": w, "num_stages": s}


def _o(bm, bp, bq, w, s):
    return {"BLOCK_M": bm, "BLOCK_P": bp, "BLOCK_Q": bq, "num_warps": w, "num_stages": s}


S2S_WIDE = [  # output wider than the rank
    _c(128, 128, 64, 8, 8, 3), _c(128, 128, 64, 8, 8, 4), _c(128, 128, 64, 8, 4, 4), _c(128, 128, 64, 1, 8, 3),
    _c(128, 128, 64, 16, 8, 3), _c(128, 256, 64, 8, 8, 3), _c(128, 128, 128, 8, 8, 3), _c(256, 128, 64, 8, 8, 3),
    _c(64, 128, 64, 8, 4, 4), _c(64, 128, 64, 8, 4, 3), _c(64, 256, 64, 8, 8, 3), _c(64, 128, 128, 8, 4, 3),
    _c(128, 64, 64, 8, 4, 4), _c(64, 64, 64, 8, 4, 4),
]
S2S_RANK = [_c(64, 16, 128, 8, 4, 3), _c(128, 16, 128, 8, 4, 4), _c(256, 16, 64, 8, 8, 3), _c(128, 16, 64, 8, 4, 4),
            _c(64, 16, 256, 8, 4, 3)]
OUTER_P_RANK = [_o(64, 16, 128, 4, 3), _o(128, 16, 128, 4, 3), _o(64, 16, 256, 8, 3), _o(32, 16, 128, 4, 4),
                _o(128, 16, 256, 8, 3), _o(64, 16, 64, 4, 4)]
OUTER_Q_RANK = [_o(64, 128, 16, 4, 3), _o(128, 128, 16, 4, 3), _o(64, 256, 16, 8, 3), _o(32, 128, 16, 4, 4),
                _o(128, 256, 16, 8, 3), _o(64, 64, 16, 4, 4)]
OUTER_WIDE = [_o(64, 128, 128, 8, 3), _o(64, 128, 64, 4, 3), _o(64, 64, 64, 4, 3), _o(32, 128, 128, 8, 3)]


def candidates(kind, key):
    if kind == "s2s":
        N = key[1]
        return S2S_RANK if N <= 32 else S2S_WIDE
    P, Q = key[0], key[1]
    return OUTER_P_RANK if P <= 32 else OUTER_Q_RANK if Q <= 32 else OUTER_WIDE


def record_step(name, T, rank):
    """Run one fwd+bwd of the block; return [(kind, key, fn, args, kwargs)] for each Triton GEMM launch."""
    from bench_moe_block import SHAPES, build_block

    from host_plugin_scattermoe import kernels as K
    from host_plugin_scattermoe import lora

    family, E, H, I, k = SHAPES[name]
    holder, cfg = build_block(family, E, H, I, k, rank)
    lora.attach(holder)
    cfg._experts_implementation = "scattermoe"
    x = torch.randn(1, T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    calls = []
    orig_s2s, orig_outer = K.scatter2scatter, K.group_outer

    def s2s(x_, W, ssi, offs, fan, **kw):
        L = ssi.numel()
        Ee, Kd, N = W.shape
        lora_ = 0 if kw.get("B") is None else (2 if kw.get("xa_in") is not None else 1)
        key = (Kd, N, lora_, bool(kw.get("grouped_in")), bool(kw.get("grouped_out")), K.m_bucket(L), Ee)
        calls.append(("s2s", key, orig_s2s, (x_, W, ssi, offs, fan), dict(kw)))
        return orig_s2s(x_, W, ssi, offs, fan, **kw)

    def outer(Lm, Rm, ssi, offs, **kw):
        L = ssi.numel()
        key = (Lm.shape[1], Rm.shape[1], kw.get("l_fan", 0) > 0, kw.get("r_fan", 0) > 0, K.m_bucket(L), offs.numel())
        calls.append(("outer", key, orig_outer, (Lm, Rm, ssi, offs), dict(kw)))
        return orig_outer(Lm, Rm, ssi, offs, **kw)

    orig_glu = K.glu_down_dx

    def glu(dout, Wt, ssi, offs, k_, h, gates, **kw):
        L = ssi.numel()
        Ee, Kd, N = Wt.shape
        lora_ = 0 if kw.get("B") is None else (2 if kw.get("xa_in") is not None else 1)
        key = (Kd, N, lora_, False, True, K.m_bucket(L), Ee, "glu")
        calls.append(("s2s", key, orig_glu, (dout, Wt, ssi, offs, k_, h, gates), dict(kw)))
        return orig_glu(dout, Wt, ssi, offs, k_, h, gates, **kw)

    K.scatter2scatter, K.group_outer, K.glu_down_dx = s2s, outer, glu
    # one small tile for every launch while recording: the step only has to run, not be fast
    K.FORCE.update(s2s=_c(64, 64, 64, 8, 4, 3), outer=_o(32, 32, 64, 4, 3))
    try:
        out = holder.mlp(x)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(g)
        torch.cuda.synchronize()
    finally:
        K.scatter2scatter, K.group_outer, K.glu_down_dx = orig_s2s, orig_outer, orig_glu
        K.FORCE.clear()
    return calls, (holder, x, g)


class _Capture:
    """Stands in for a @triton.jit kernel: records the launch arguments instead of running."""

    def __init__(self):
        self.got = None

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.got = (args, kw)
        return launch


def compile_jobs(calls):
    """Arguments of every (call, candidate) launch, tensors replaced by their dtypes (for warmup)."""
    from host_plugin_scattermoe import kernels as K

    jobs = []
    for kind, key, fn, args, kw in calls:
        attr = "_s2s_kernel" if kind == "s2s" else "_group_outer_kernel"
        real = getattr(K, attr)
        for cfg in candidates(kind, key):
            cap = _Capture()
            setattr(K, attr, cap)
            K.FORCE[kind] = cfg
            try:
                fn(*args, **kw)
            finally:
                setattr(K, attr, real)
                K.FORCE.clear()
            a, k2 = cap.got
            desc = [("T", str(v.dtype).split(".")[1]) if torch.is_tensor(v) else ("V", v) for v in a]
            kw2 = {kk: (("tl", v.name) if kk == "COMPUTE" else v) for kk, v in k2.items()}
            jobs.append((attr, desc, kw2))
    uniq = {pickle.dumps(j): j for j in jobs}
    return list(uniq.values())


def worker(path, idx, n):
    """Compile jobs[idx::n] into Triton's cache (no launch)."""
    import triton.language as tl

    from host_plugin_scattermoe import kernels as K

    jobs = pickle.load(open(path, "rb"))
    for attr, desc, kw in jobs[idx::n]:
        kern = getattr(K, attr)
        args = [getattr(torch, v) if t == "T" else v for t, v in desc]
        kw = dict(kw)
        if "COMPUTE" in kw:
            kw["COMPUTE"] = tl.dtype(kw["COMPUTE"][1])
        try:
            kern.warmup(*args, grid=(1,), **kw)
        except Exception as e:  # noqa: BLE001 - a config that does not compile is reported by the timing phase
            print(f"[worker {idx}] compile failed {attr} {kw.get('BLOCK_M')},{kw.get('BLOCK_N', kw.get('BLOCK_P'))}: {repr(e)[:160]}",
                  flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=None)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--workers", type=int, default=14)
    ap.add_argument("--worker", nargs=3, default=None)
    ap.add_argument("--rep", type=int, default=25)
    ap.add_argument("--only-glu", action="store_true", help="time only the fused GLU-backward launches")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), int(args.worker[2]))
        return 0
    import triton

    from bench_moe_block import SHAPES

    from host_plugin_scattermoe import experts
    from host_plugin_scattermoe import kernels as K

    experts.register()
    out_dir = os.environ.get("OUT", "/tmp")
    names = args.shapes or ["Qwen3-30B-A3B", "Qwen3.5-35B-A3B", "OLMoE-1B-7B", "gpt-oss-20b", "Mixtral-8x7B"]
    t0 = time.time()
    recorded = {}
    all_jobs = []
    keep = []
    for name in names:
        calls, alive = record_step(name, args.tokens, args.rank)
        seen, uniq = set(), []
        if args.only_glu:
            calls = [c for c in calls if c[1][-1] == "glu"]
        for c in calls:
            if (c[0], c[1]) not in seen:
                seen.add((c[0], c[1]))
                uniq.append(c)
        recorded[name] = uniq
        keep.append(alive)
        all_jobs += compile_jobs(uniq)
    print(f"recorded {sum(len(v) for v in recorded.values())} launches, {len(all_jobs)} compile jobs in {time.time() - t0:.0f}s",
          flush=True)
    path = os.path.join(out_dir, "tune_jobs.pkl")
    pickle.dump(all_jobs, open(path, "wb"))
    t1 = time.time()
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", path, str(i), str(args.workers)])
             for i in range(args.workers)]
    for p in procs:
        p.wait()
    print(f"parallel compile: {time.time() - t1:.0f}s", flush=True)
    rows = []
    table = {}
    for name in names:
        for kind, key, fn, a, kw in recorded[name]:
            times = []
            for cfg in candidates(kind, key):
                K.FORCE[kind] = cfg
                try:
                    ms = triton.testing.do_bench(lambda: fn(*a, **kw), warmup=5, rep=args.rep, return_mode="median")
                except Exception as e:  # noqa: BLE001
                    ms = float("inf")
                    print("failed", name, kind, key, cfg, repr(e)[:120], flush=True)
                K.FORCE.clear()
                times.append((ms, cfg))
            # the rule's pick, as the launcher makes it
            K._PICKED.clear()
            ms_rule = triton.testing.do_bench(lambda: fn(*a, **kw), warmup=5, rep=args.rep, return_mode="median")
            rule = next(iter(K._PICKED.values()), None)
            times.sort(key=lambda t: t[0])
            best_ms, best = times[0]
            table[(kind, *key)] = best
            rows.append(dict(shape=name, kind=kind, key=list(key), best=best, best_ms=best_ms, rule=rule, rule_ms=ms_rule,
                             worst_ms=max(t[0] for t in times if t[0] < float("inf")),
                             all=[(t[0], t[1]) for t in times]))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "all"}), flush=True)
            json.dump({"device": torch.cuda.get_device_name(), "triton": triton.__version__, "rows": rows},
                      open(os.path.join(out_dir, "tune_tiles.json"), "w"), indent=1)
    json.dump({"device": torch.cuda.get_device_name(), "triton": triton.__version__, "rows": rows},
              open(os.path.join(out_dir, "tune_tiles.json"), "w"), indent=1)
    print(f"\ndevice {torch.cuda.get_device_name()}  total {time.time() - t0:.0f}s")
    print(f"{'shape':<16}{'kind':<6}{'key':<44}{'best ms':>8}{'rule ms':>8}{'worst':>8}  best")
    for r in rows:
        b = r["best"]
        bs = ",".join(str(b[k]) for k in b)
        print(f"{r['shape']:<16}{r['kind']:<6}{str(tuple(r['key'])):<44}{r['best_ms']:>8.3f}{r['rule_ms']:>8.3f}{r['worst_ms']:>8.3f}  {bs}")
    per_shape = {}
    for r in rows:
        s = per_shape.setdefault(r["shape"], [0.0, 0.0])
        s[0] += r["best_ms"]
        s[1] += r["rule_ms"]
    for n, (b, ru) in per_shape.items():
        print(f"sum of launches {n}: best {b:.3f} ms, rule {ru:.3f} ms")
    print("best = {")
    for k, v in table.items():
        print(f"    {k!r}: {v!r},")
    print("}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
