"""`host train` with and without liger (and scattermoe) at Qwen3-30B-A3B's width, cut to 4 layers.

Model: Qwen3-MoE, H 2048, 128 experts, I 768, top-8, 32 heads / 4 KV heads, head_dim 128, random bf16
weights, vocabulary 151,936 (Qwen3's) and 262,144 (Gemma 4's). Training: sequence 4096 (full rows),
micro-batch 2, gradient checkpointing, LoRA r=16 on attention and on the expert parameters, bf16.
Each variant is ``host.train.train`` on its own config (the function ``host train`` calls), run one
after another in this process with the peak-memory counter reset between them (liger's patches are
undone at the end of each run). Numbers are the run summaries' ``steady_tokens_per_s`` (a
device-synchronised window over the second half of training) and ``peak_memory_gib``.

A component timing of the loss head (lm_head + cross-entropy, forward+backward, at these shapes)
shows how much of a step the logits cost with and without the fused loss.

Usage: python bench/bench_liger.py [--steps 8] [--variants plain,liger,...] (writes results/bench_liger.json)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import time
from pathlib import Path

import yaml

from host import hookimpl

LIGER = {"liger_rope": True, "liger_rms_norm": True, "liger_fused_linear_cross_entropy": True}
VARIANTS = {  # name -> (plugins, vocabulary)
    "plain": ([], 151936),
    "liger": (["liger"], 151936),
    "scattermoe": (["scattermoe"], 151936),
    "scattermoe+liger": (["scattermoe", "liger"], 151936),
    "scattermoe+liger-chunk0": (["scattermoe", "liger"], 151936),  # liger-kernel's own chunking (128 rows here)
    "scattermoe+liger-2": (["scattermoe", "liger"], 151936),  # the same again, later in the process (order effects)
    # host-sync and launch-overhead experiments (see sync_variant and EXTRA_KEYS)
    "scattermoe+liger-syncs": (["scattermoe", "liger"], 151936),  # liger-kernel's own loss syncs (plugin's fix undone)
    "scattermoe+liger-nosync": (["scattermoe", "liger"], 151936),  # also no Trainer syncs (bench-only patches)
    "scattermoe+liger-graph": (["scattermoe", "liger"], 151936),  # reentrant checkpointing + scattermoe_cuda_graph
    "scattermoe+liger-compile": (["scattermoe", "liger"], 151936),  # torch_compile: true
    "plain@262k": ([], 262144),
    "liger@262k": (["liger"], 262144),
    "scattermoe+liger@262k": (["scattermoe", "liger"], 262144),
}


#: per-variant config keys on top of the common ones
EXTRA_KEYS = {
    "scattermoe+liger-graph": {"gradient_checkpointing_kwargs": {"use_reentrant": True}, "scattermoe_cuda_graph": True},
    "scattermoe+liger-compile": {"torch_compile": True},
}


@contextlib.contextmanager
def sync_variant(name: str):
    """Bench-only switches for measuring host syncs (undone afterwards).

    ``-syncs``: the liger plugin's sync-free fused loss is undone (liger-kernel's ``.item()`` and ``torch.equal``
    run as shipped), i.e. the state before the fix. ``-nosync``: additionally the HF Trainer's per-step syncs are
    off: ``logging_nan_inf_filter`` (``isnan``/``isinf`` of the loss read on the host) and the tokens-seen counter
    (``.item()`` of a device tensor), which here counts ``input_ids.numel()`` on the host (every bench row is a
    full, unpadded sequence, so this is the same number; one GPU only)."""
    from transformers import Trainer

    import host.train
    from host_plugin_liger import sync_free

    saved = []

    def patch(owner, attr, value):
        saved.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, value)

    if name.endswith("-syncs"):
        patch(sync_free, "forward", lambda original: original)
        patch(sync_free, "backward", lambda original: original)
    if name.endswith("-nosync"):
        make_args = host.train.training_arguments

        def no_nan_filter(*a, **kw):
            args = make_args(*a, **kw)
            args.logging_nan_inf_filter = False
            return args

        patch(host.train, "training_arguments", no_nan_filter)

        def count_on_host(self, inputs):
            self.state.num_input_tokens_seen += int(inputs["input_ids"].numel())

        patch(Trainer, "_track_num_input_tokens", count_on_host)
    try:
        yield
    finally:
        for owner, attr, value in reversed(saved):
            setattr(owner, attr, value)


def build_model(path: Path, vocab: int, layers: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from host.testing import build_tokenizer, sample_texts, tiny_config

    if (path / "config.json").exists():
        return
    tok = build_tokenizer(sample_texts(), path, vocab_size=4096)
    cfg = tiny_config(
        "qwen3_moe", vocab, hidden_size=2048, num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144,
        max_position_embeddings=8192,
    )
    cfg.eos_token_id, cfg.pad_token_id = tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path)
    del model


def config(work: Path, name: str, plugins: list[str], vocab: int, steps: int, seq: int, batch: int,
           chunk_rows: int | None = None) -> Path:
    cfg = {
        "base_model": str(work / f"model-{vocab}"),
        "plugins": plugins,
        "datasets": [{"path": str(work / "data.jsonl"), "type": "completion"}],
        "dataset_prepared_path": str(work / "prepared"),
        "sequence_len": seq,
        "pad_to_sequence_len": True,
        "adapter": "lora",
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "lora_target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        "micro_batch_size": batch,
        "gradient_checkpointing": True,
        "max_steps": steps,
        "learning_rate": 1e-4,
        "lr_scheduler": "constant",
        "bf16": True,
        "logging_steps": steps // 2,
        "save_steps": 10**6,
        "output_dir": str(work / "runs" / name),
        "seed": 0,
        **(LIGER if "liger" in plugins else {}),
        **EXTRA_KEYS.get(name, {}),
    }
    if "liger" in plugins and chunk_rows is not None:
        cfg["liger_fused_linear_cross_entropy_chunk_rows"] = chunk_rows
    shutil.rmtree(cfg["output_dir"], ignore_errors=True)  # a variant named twice runs twice (host refuses to overwrite)
    path = work / f"{name.replace('@', '-').replace('+', '-')}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


class Profiler:
    """A host plugin object for one run: torch.profiler over training steps [start, stop) (before the steady
    window the summary's tokens/s is measured on), top CUDA kernels written to ``out``."""

    def __init__(self, out: Path, start: int = 2, stop: int = 4):
        self.out, self.start, self.stop = out, start, stop

    @hookimpl
    def trainer_callbacks(self, cfg):
        import torch
        from transformers import TrainerCallback

        prof = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == prof.start:
                    torch.cuda.synchronize()
                    prof.t0 = time.perf_counter()
                    prof.p = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                                torch.profiler.ProfilerActivity.CPU])
                    prof.p.__enter__()

            def on_step_end(self, args, state, control, **kw):
                if state.global_step == prof.stop:
                    torch.cuda.synchronize()
                    prof.wall_ms = (time.perf_counter() - prof.t0) * 1e3 / (prof.stop - prof.start)
                    prof.p.__exit__(None, None, None)
                    prof.write(prof.stop - prof.start)

        return [Callback()]

    def write(self, steps: int) -> None:
        import torch

        cuda = torch.autograd.DeviceType.CUDA  # kernels only (an op's self device time repeats its kernels')
        kernels = sorted(((e.key, e.self_device_time_total / 1e3 / steps, e.count // steps)
                          for e in self.p.key_averages() if e.device_type == cuda and e.self_device_time_total > 0),
                         key=lambda t: -t[1])
        total = sum(k[1] for k in kernels)
        self.summary = {"steps": steps, "kernel_ms_per_step": round(total, 2), "wall_ms_per_step": round(self.wall_ms, 2),
                        "top": [{"kernel": k[:120], "ms_per_step": round(ms, 3), "calls_per_step": n,
                                 "share": round(ms / total, 4)} for k, ms, n in kernels[:40]]}
        cpu_ms = sum(e.self_cpu_time_total for e in self.p.key_averages()) / 1e3 / steps
        self.summary["self_cpu_ms_per_step"] = round(cpu_ms, 2)
        self.out.write_text(self.p.key_averages().table(sort_by="self_device_time_total", row_limit=60)
                            + f"\n\nBy self CPU time (all ops: {cpu_ms:.1f} ms per step, profiler overhead included):\n"
                            + self.p.key_averages().table(sort_by="self_cpu_time_total", row_limit=60))


_SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",  # runtime calls, and the
               "aten::_local_scalar_dense", "aten::nonzero")  # ops behind .item() / bool() / torch.equal, nonzero


class SyncList:
    """A host plugin object for one run: every host-device synchronisation of training step ``step`` + 1, with the
    Python frames it came from (torch.profiler with stacks: each CUDA runtime sync call and its nearest caller
    with a stack), plus the count torch's sync debug mode warns about in that step; written to ``out``."""

    def __init__(self, out: Path, step: int = 1):
        self.out, self.step, self.found = out, step, []

    @hookimpl
    def trainer_callbacks(self, cfg):
        import warnings

        import torch
        from transformers import TrainerCallback

        me = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == me.step:
                    torch.cuda.synchronize()
                    me.warned = []
                    me.filters, me.show = warnings.filters[:], warnings.showwarning
                    warnings.simplefilter("always")
                    warnings.showwarning = lambda msg, *a, **k: me.warned.append(str(msg)[:80])
                    torch.cuda.set_sync_debug_mode("warn")
                    me.p = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                              torch.profiler.ProfilerActivity.CUDA], with_stack=True)
                    me.p.__enter__()

            def on_step_end(self, args, state, control, **kw):
                if state.global_step == me.step + 1:
                    torch.cuda.set_sync_debug_mode(0)
                    me.p.__exit__(None, None, None)
                    warnings.filters[:], warnings.showwarning = me.filters, me.show
                    me.write()

        return [Callback()]

    def write(self) -> None:
        lines = []
        for e in self.p.events():
            if e.name not in _SYNC_CALLS:
                continue
            chain, parent = [], e.cpu_parent  # with_stack: Python frames are parent events named "file(line): func"
            while parent is not None:
                chain.extend(parent.stack or [parent.name])
                parent = parent.cpu_parent
            ops = [c for c in chain if "): " not in c][:4]
            frames = [c for c in chain if "): " in c and "/torch/" not in c and "/triton/" not in c][:8]
            self.found.append({"sync": e.name, "ops": ops, "frames": frames})
            lines.append(f"{e.name} <- {' <- '.join(ops)}\n    " + "\n    ".join(frames))
        self.summary = {"syncs": len(self.found), "sync_debug_warnings": len(self.warned), "found": self.found}
        self.out.write_text(f"{len(self.found)} sync points in one training step (runtime sync calls, and the ops that cause them) "
                            f"({len(self.warned)} sync-debug warnings)\n\n" + "\n\n".join(lines) + "\n")


def run_variant(path: Path, profile_to: Path | None = None, syncs_to: Path | None = None) -> dict:
    import torch

    from host.config import load_config
    from host.train import train

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cfg, pm, warnings = load_config(path)
    prof = None
    if profile_to is not None:
        prof = Profiler(profile_to)
        pm.register(prof, name="bench-profiler")
    syncs = None
    if syncs_to is not None:
        syncs = SyncList(syncs_to)
        pm.register(syncs, name="bench-syncs")
    summary = train(cfg, pm, warnings)
    if prof is not None and hasattr(prof, "summary"):
        summary["profile"] = prof.summary
    if syncs is not None and hasattr(syncs, "summary"):
        summary["syncs"] = syncs.summary
    gc.collect()
    torch.cuda.empty_cache()
    return summary


def loss_head_ms(tokens: int, hidden: int, vocab: int, chunk_rows=(0, 256, 512, 1024, 2048, 4096)) -> dict:
    """lm_head + loss forward+backward at the bench's shapes: materialised logits vs liger's fused loss, the
    latter with liger's own chunking (rows 0) and with the plugin's ``chunk_rows`` settings."""
    import torch
    import torch.nn.functional as F
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    from host_plugin_liger import chunk_mem_const

    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16) * 0.02  # frozen head (LoRA elsewhere)
    y = torch.randint(0, vocab, (tokens,), device="cuda")

    def plain():
        return F.cross_entropy((h @ w.T).float(), y)

    def fused(rows):
        c = chunk_mem_const(tokens, hidden, vocab, rows)
        return lambda: liger_fused_linear_cross_entropy(h, w, y, chunk_mem_const=c)

    out = {}
    for name, fn in (("materialised", plain), *((f"fused_rows{r}", fused(r)) for r in chunk_rows)):
        for _ in range(2):
            fn().backward()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            fn().backward()
        end.record()
        torch.cuda.synchronize()
        out[name] = {"ms": round(start.elapsed_time(end) / 5, 2),
                     "extra_peak_gib": round((torch.cuda.max_memory_allocated() - base) / 2**30, 2)}
        h.grad = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--variants", default="plain,liger,scattermoe+liger,scattermoe,plain@262k,scattermoe+liger@262k")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-liger"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--profile", default="", help="variants to profile (torch.profiler over steps 2-3, before the "
                    "steady window): top CUDA kernels into the JSON and profile_<variant>.txt")
    ap.add_argument("--syncs", default="", help="variants whose training step 3 is listed with every host sync "
                    "(torch.profiler with stacks + torch.cuda sync debug mode) for the second training step: syncs_<variant>.txt")
    ap.add_argument("--loss-head", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--chunk-rows", type=int, default=None, help="liger_fused_linear_cross_entropy_chunk_rows")
    args = ap.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from host.testing import sample_texts, write_jsonl

    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.work / "data.jsonl", [{"text": t} for t in sample_texts() * 12])
    device = torch.cuda.get_device_name(0)
    doc = {"device": device, "date": time.strftime("%Y-%m-%d"), "layers": args.layers, "seq": args.seq,
           "micro_batch": args.batch, "steps": args.steps, "liger_keys": sorted(LIGER), "runs": []}
    doc["loss_head"] = {}
    if args.loss_head:
        doc["loss_head"] = {v: loss_head_ms(args.batch * args.seq, 2048, v) for v in (151936, 262144)}
        print(json.dumps(doc["loss_head"]), flush=True)
    profiled = set(filter(None, args.profile.split(",")))
    listed = set(filter(None, args.syncs.split(",")))
    results = doc["runs"]
    for name in names:
        plugins, vocab = VARIANTS[name]
        build_model(args.work / f"model-{vocab}", vocab, args.layers)
        t0 = time.time()
        resident = round(torch.cuda.memory_allocated() / 2**30, 2)  # left over from earlier runs (should be ~0)
        try:
            rows = 0 if name.endswith("-chunk0") else args.chunk_rows
            path = config(args.work, name, plugins, vocab, args.steps, args.seq, args.batch, rows)
            with sync_variant(name):
                s = run_variant(path, args.out / f"profile_{name}.txt" if name in profiled else None,
                                args.out / f"syncs_{name}.txt" if name in listed else None)
            row = {"variant": name, "vocab": vocab, "tokens_per_s": s["steady_tokens_per_s"],
                   "peak_gib": s["peak_memory_gib"], "final_loss": s["final_train_loss"], "steps": s["steps"]}
            if "syncs" in s:
                row["syncs"] = s["syncs"]
                print(f"syncs {name}: {s['syncs']['syncs']} sync calls in one step, {s['syncs']['sync_debug_warnings']} "
                      "sync-debug warnings", flush=True)
                for f in s["syncs"]["found"]:
                    print(f"  {f['sync']} <- {' <- '.join(f['ops'][:3])} @ {(f['frames'] or ['?'])[0]}")
            if "profile" in s:
                row["profile"] = s["profile"]
                print(f"profile {name}: {s['profile']['kernel_ms_per_step']} kernel ms/step, {s['profile']['wall_ms_per_step']} "
                      f"wall ms/step, {s['profile']['self_cpu_ms_per_step']} self-CPU ms/step (profiled steps)", flush=True)
                for k in s["profile"]["top"][:25]:
                    print(f"  {k['ms_per_step']:8.2f} ms {k['calls_per_step']:5d}x {100 * k['share']:5.1f}%  {k['kernel'][:90]}")
        except Exception as exc:
            row = {"variant": name, "vocab": vocab, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        row["seconds"], row["resident_gib_before"] = round(time.time() - t0, 1), resident
        results.append(row)
        print(json.dumps(row), flush=True)
        (args.out / "bench_liger.json").write_text(json.dumps(doc, indent=1) + "\n")  # after each run: a timeout keeps it
    head = doc["loss_head"]
    print(f"\n{device}, Qwen3-MoE H 2048 E 128 I 768 top-8, {args.layers} layers, seq {args.seq}, micro-batch {args.batch}, "
          f"gradient checkpointing, LoRA r=16 attention+experts, bf16, {args.steps} steps")
    print(f"{'variant':<24}{'vocab':>8}{'tokens/s':>10}{'vs plain':>9}{'peak GiB':>10}{'vs plain':>9}{'loss':>8}")
    plain = {r["vocab"]: r for r in results if r["variant"].startswith("plain") and "error" not in r}
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<24}{r['vocab']:>8}  ERROR {r['error']}")
            continue
        p = plain.get(r["vocab"])
        rt = f"{r['tokens_per_s'] / p['tokens_per_s']:.2f}x" if p else "-"
        rm = f"{r['peak_gib'] / p['peak_gib']:.2f}x" if p else "-"
        print(f"{r['variant']:<24}{r['vocab']:>8}{r['tokens_per_s']:>10.0f}{rt:>9}{r['peak_gib']:>10.2f}{rm:>9}{r['final_loss']:>8.3f}")
    for v, h in head.items():
        print(f"loss head at vocab {v}, {args.batch * args.seq} tokens: "
              + ", ".join(f"{k} {x['ms']} ms (+{x['extra_peak_gib']} GiB)" for k, x in h.items()))


if __name__ == "__main__":
    main()
