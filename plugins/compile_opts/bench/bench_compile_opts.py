"""Step time and peak memory of LoRA training under each torch_compile_options flag.

Trains a real-width dense model (random weights, Qwen3 architecture: hidden 2048, intermediate 6144,
16 heads / 8 KV heads of 128, vocab 151936, tied embeddings, i.e. Qwen3-1.7B's width) with PEFT LoRA
r=16 on q/k/v/o, sequence 2048, micro-batch 1, bf16, through the real HF Trainer (which compiles the
model lazily through accelerate when torch_compile is on). The flags are applied by the plugin's
own CompileOptionsCallback, as in `host train`.

Conditions (each in a fresh process): eager; compile; compile + each allowlisted flag alone,
flipped from torch's default (so for flags that default to True this measures turning them off);
compile + all flags set to true. Step 1 includes compilation; then `--warmup` steps, then `--steps`
timed steps (median reported). Peak memory: max_memory_allocated over the warm-up and timed steps,
and over the whole run (compilation and autotuning included).

To fit one short device session, workers run in waves: the processes of a wave start, build and
compile concurrently (CPU work; each gets cores/N Inductor compile threads), then the orchestrator
lets them run their timed steps one at a time while the others wait idle, so timing never
overlaps other work. Inductor/Triton caches start empty and are shared by all workers, so the first
wave's `compile` first-step time is the cold start; later waves reuse Triton kernels that were
already built (their first-step times are warm-ish and not comparable).

    python bench_compile_opts.py [--layers 8] [--steps 40] [--out DIR] [--waves 'compile,max_autotune_gemm;all']
    python bench_compile_opts.py --tiny --device cpu --conditions eager,compile   # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # host_plugin_compile_opts without installing

from host_plugin_compile_opts.options import ALLOWLIST  # noqa: E402

# Waves: autotuning flags (max_autotune_gemm, coordinate_descent_tuning) in different waves.
WAVES = [
    ["eager", "compile"],
    ["max_autotune_gemm", "all", "triton.cudagraphs", "shape_padding", "epilogue_fusion"],
    ["coordinate_descent_tuning", "coordinate_descent_check_all_directions", "fx_graph_cache",
     "assume_aligned_inputs", "comprehensive_padding", "decompose_mem_bound_mm"],
]
assert sorted(c for w in WAVES for c in w if c not in ("eager", "compile", "all")) == sorted(ALLOWLIST)


# --- worker ----------------------------------------------------------------------------------


def worker(spec: dict) -> None:
    t_start = time.time()
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("host.compile_opts").setLevel(logging.INFO)  # what was set, and the precision repair
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen3Config, Trainer, TrainerCallback, TrainingArguments
    from transformers.data.data_collator import default_data_collator

    from host_plugin_compile_opts import options as opts
    from host_plugin_compile_opts.callback import CompileOptionsCallback

    name, a = spec["name"], spec["args"]
    cuda = a["device"] == "cuda"
    result: dict = {"name": name, "ok": False}
    out = Path(spec["result"])

    def save():
        out.write_text(json.dumps(result, indent=1))

    config = opts.inductor_config()
    if name == "eager" or name == "compile":
        options = {}
    elif name == "all":
        options = {k: True for k in ALLOWLIST}
    else:
        options = {name: not opts.read_flag(config, name)}
    result["options"] = options
    compile_on = name != "eager"

    dims = dict(hidden_size=2048, intermediate_size=6144, num_attention_heads=16, num_key_value_heads=8,
                head_dim=128, vocab_size=151936)
    if a["tiny"]:
        dims = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, vocab_size=512)
    mcfg = Qwen3Config(**dims, num_hidden_layers=a["layers"], max_position_embeddings=max(4096, a["seq"]),
                       tie_word_embeddings=True)
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    with torch.device(a["device"]):
        model = AutoModelForCausalLM.from_config(mcfg, dtype=dtype, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                             task_type="CAUSAL_LM"))
    total = 1 + a["warmup"] + a["steps"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, dims["vocab_size"], (total, a["seq"]), generator=g)
    data = [{"input_ids": row, "labels": row} for row in ids]

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    ready, go = Path(spec["ready"]), Path(spec["go"])

    class Timer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.t0 = 0.0

        def on_train_begin(self, args, state, control, **kw):
            result["startup_s"] = round(time.time() - t_start, 2)

        def on_step_begin(self, args, state, control, **kw):
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync()
            self.times.append(time.perf_counter() - self.t0)
            if state.global_step == 1:
                # compiled: report and wait for the GPU to be ours alone
                result["first_step_s"] = round(self.times[0], 2)
                if cuda:
                    result["peak_compile_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                save()
                ready.write_text("1")
                while not go.exists():
                    time.sleep(0.02)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()

    timer = Timer()
    callbacks = [timer] + ([CompileOptionsCallback(options)] if options else [])
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix=f"bench-{name}-"),
        per_device_train_batch_size=1,
        max_steps=total,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        bf16=cuda,
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        torch_compile=compile_on,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
        use_cpu=not cuda,
    )
    if compile_on:  # as `host train` does: TrainingArguments left a mixed fp32-precision state
        from host.precision import fix_mixed_matmul_precision

        fix_mixed_matmul_precision()
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator,
                      callbacks=callbacks)
    train_out = trainer.train()
    timed = timer.times[1 + a["warmup"]:]
    result.update(
        ok=True,
        steps_timed=len(timed),
        median_ms=round(statistics.median(timed) * 1e3, 2),
        min_ms=round(min(timed) * 1e3, 2),
        max_ms=round(max(timed) * 1e3, 2),
        train_loss=round(float(train_out.training_loss), 4),
        flags_after={k: opts.read_flag(config, k) for k in options},
    )
    if cuda:
        result["peak_steps_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    try:
        from torch._dynamo.utils import counters

        result["unique_graphs"] = int(counters["stats"]["unique_graphs"])
        result["graph_breaks"] = int(sum(counters["graph_break"].values()))
    except Exception:
        pass
    save()


# --- orchestrator ----------------------------------------------------------------------------


def run_wave(wave: list[str], a, log_dir: Path, env: dict, wave_timeout: float) -> dict[str, dict]:
    procs = {}
    threads = max(1, (os.cpu_count() or 2) // len(wave))
    for name in wave:
        safe = name.replace(".", "_")
        spec = {
            "name": name,
            "args": vars(a),
            "result": str(log_dir / f"{safe}.json"),
            "ready": str(log_dir / f"{safe}.ready"),
            "go": str(log_dir / f"{safe}.go"),
        }
        wenv = dict(env, TORCHINDUCTOR_COMPILE_THREADS=str(threads))
        logf = open(log_dir / f"{safe}.log", "w")
        p = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], env=wenv,
                             stdout=logf, stderr=subprocess.STDOUT)
        procs[name] = (p, spec, logf)
    t0 = time.time()
    # phase 1: everyone builds and compiles (step 1) concurrently
    pending = set(wave)
    while pending and time.time() - t0 < wave_timeout:
        for name in list(pending):
            p, spec, _ = procs[name]
            if Path(spec["ready"]).exists() or p.poll() is not None:
                pending.discard(name)
        time.sleep(0.1)
    compile_wait = round(time.time() - t0)
    for name in pending:  # still compiling at the timeout: stop them before anything is timed
        procs[name][0].kill()
    # phase 2: timed steps one process at a time, the others idle
    results = {}
    for name in wave:
        p, spec, logf = procs[name]
        if name not in pending:
            Path(spec["go"]).write_text("1")
            try:
                p.wait(timeout=max(30.0, wave_timeout - (time.time() - t0)))
            except subprocess.TimeoutExpired:
                p.kill()
        p.wait()
        logf.close()
        res_path = Path(spec["result"])
        res = json.loads(res_path.read_text()) if res_path.exists() else {"name": name, "ok": False}
        if not res.get("ok"):
            tail = (log_dir / f"{name.replace('.', '_')}.log").read_text().strip().splitlines()[-3:]
            res["error"] = f"still compiling after {compile_wait} s (killed)" if name in pending else (" | ".join(tail) or f"exit {p.returncode}")
        results[name] = res
        print(f"  {name}: {json.dumps(res)}", flush=True)
    return results


def fmt_table(results: dict[str, dict], order: list[str]) -> str:
    base = results.get("compile", {}).get("median_ms") if results.get("compile", {}).get("ok") else None
    eager = results.get("eager", {}).get("median_ms") if results.get("eager", {}).get("ok") else None
    rows = ["| condition | options | median ms/step | vs eager | vs compile | first step s | peak GiB (steps) | peak GiB (incl. compile) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in order:
        r = results.get(name)
        if r is None:
            rows.append(f"| {name} | | not run (time) | | | | | |")
            continue
        opts = ", ".join(f"{k}={v}" for k, v in (r.get("options") or {}).items()) if name != "all" else "all 10 = True"
        if not r.get("ok"):
            rows.append(f"| {name} | {opts} | failed: {str(r.get('error'))[:160]} | | | | | |")
            continue
        ms = r["median_ms"]
        vs_e = f"{(ms / eager - 1) * 100:+.1f}%" if eager else ""
        vs_c = f"{(ms / base - 1) * 100:+.1f}%" if base and name != "eager" else ""
        rows.append(f"| {name} | {opts} | {ms:.1f} | {vs_e} | {vs_c} | {r.get('first_step_s', '')} | "
                    f"{r.get('peak_steps_gib', '')} | {r.get('peak_compile_gib', '')} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=40, help="timed steps after warm-up")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps after the compile step")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny dims (smoke test of the script)")
    ap.add_argument("--conditions", help="comma-separated subset of conditions")
    ap.add_argument("--waves", help="explicit waves: 'a,b;c,d' (overrides --conditions)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"), help="logs and results.json go here")
    ap.add_argument("--cache", default=None, help="Inductor/Triton cache root (default: a fresh temp dir)")
    ap.add_argument("--reuse-cache", action="store_true",
                    help="keep what --cache holds (split long autotuning waves over several calls; first-step times are then warm)")
    ap.add_argument("--deadline", type=float, default=1e9, help="start no wave after this many seconds")
    ap.add_argument("--wave-timeout", type=float, default=240.0)
    ap.add_argument("--budget", type=float, default=1e9, help="finish (killing stragglers) within this many seconds")
    a = ap.parse_args()
    if a.worker:
        return worker(json.loads(a.worker))

    import torch

    waves = WAVES
    if a.conditions:
        keep = a.conditions.split(",")
        waves = [[c for c in w if c in keep] for w in WAVES]
        waves = [w for w in waves if w]
    if a.waves:
        waves = [w.split(",") for w in a.waves.split(";")]
    order = [c for w in waves for c in w]
    out = Path(a.out)
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(a.cache or tempfile.mkdtemp(prefix="bench-cache-"))
    if not a.reuse_cache:
        shutil.rmtree(cache, ignore_errors=True)
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"), TRITON_CACHE_DIR=str(cache / "triton"),
               TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    device = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    print(f"device: {device}; torch {torch.__version__}; layers {a.layers}, seq {a.seq}, "
          f"{a.warmup} warm-up + {a.steps} timed steps", flush=True)
    t0 = time.time()
    results: dict[str, dict] = {}
    for i, wave in enumerate(waves):
        left = a.budget - (time.time() - t0)
        if time.time() - t0 > a.deadline or left < 60:
            print(f"wave {i} {wave}: skipped (deadline)", flush=True)
            continue
        tw = time.time()
        print(f"wave {i}: {wave}", flush=True)
        results.update(run_wave(wave, a, log_dir, env, min(a.wave_timeout, left - 20)))
        print(f"wave {i} took {time.time() - tw:.0f} s", flush=True)
        report(results, order, a, device, t0, out)  # after every wave: partial results survive a kill


def report(results, order, a, device, t0, out: Path) -> None:
    import torch

    meta = {"device": device, "torch": torch.__version__, "date": datetime.date.today().isoformat(), "args": vars(a),
            "total_s": round(time.time() - t0, 1)}
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    width = "tiny dims" if a.tiny else "Qwen3 hidden 2048 / inter 6144 / vocab 151936"
    print(f"\n{device}, torch {torch.__version__}, {meta['date']}; {width}, {a.layers} layers, LoRA r=16 q/k/v/o, "
          f"seq {a.seq}, micro-batch 1, {'bf16' if a.device == 'cuda' else 'fp32'}; median of {a.steps} steps "
          f"after {a.warmup} warm-up; elapsed {meta['total_s']} s")
    print(fmt_table(results, order), flush=True)


if __name__ == "__main__":
    main()
