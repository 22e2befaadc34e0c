"""Reproduce the Gemma 4 shared-KV leak the way the seed saw it: FSDP2 (fully_shard) + activation
checkpointing, and measure it with and without the plugin's side channel.

    torchrun --nproc-per-node 2 plugins/gemma4/bench/fsdp2_shared_kv.py [--steps 50] [--seq 4096] [--out DIR]
    (--smoke: tiny model on CPU/gloo, to check the script)

Each rank builds the same real-width Gemma 4 (random weights, 6 layers, KV sharing on), shards every
decoder layer and the root with ``torch.distributed.fsdp.fully_shard``, turns on transformers'
gradient checkpointing and trains ``--steps`` SGD steps; first with the plugin (side channel), then, after
freeing everything, without it. Per step it records ``memory_allocated`` after the step and the peak
inside it. Rank 0 writes JSON and prints a table last.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import common  # noqa: E402


def run(with_plugin, device, smoke, steps, seq, mesh):
    from torch.distributed.fsdp import fully_shard

    import host_plugin_gemma4 as plugin
    from host_plugin_gemma4 import shared_kv

    dtype = torch.float32 if smoke else torch.bfloat16
    vocab = 512 if smoke else 32768
    m = common.build(smoke, device, dtype, vocab=vocab)
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m.train()
    if with_plugin:
        plugin.post_model_build(cfg=common.plugin_cfg(gemma4_fix_logged_loss=False, gemma4_shared_kv_side_channel=True), model=m)
    refs, step = common.track_shared_v(m)
    for layer in m.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(m, mesh=mesh)
    stale = []

    def on_step(s):  # V tensors stored by earlier steps still alive after step s
        gc.collect()
        stale.append(sum(r() is not None for k, v in refs.items() if k < s for r in v))
        step[0] = s + 1

    stats = common.train_steps(m, steps, seq, device, vocab, on_step=on_step)
    stats = [(*st, n) for st, n in zip(stats, stale)]
    if with_plugin:
        shared_kv.set_store(None)
    del m
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return stats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    cuda = torch.cuda.is_available() and not a.smoke
    rank = int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cuda" if cuda else "cpu", (world,))
    steps = min(a.steps, 5) if a.smoke else a.steps
    seq = 32 if a.smoke else a.seq
    results = {}
    for label, flag in (("with plugin", True), ("without plugin", False)):
        results[label] = run(flag, device, a.smoke, steps, seq, mesh)
        dist.barrier()
    if rank == 0:
        import transformers

        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "world": world, "seq": seq,
                "steps": steps, "torch": torch.__version__, "transformers": transformers.__version__}
        (out / "fsdp2_shared_kv.json").write_text(json.dumps({"meta": meta, **results}, indent=1))
        print(f"\n## FSDP2 ({world} ranks) + activation checkpointing, {meta['device']}, seq {seq}, "
              f"transformers {meta['transformers']}, rank 0")
        print("| run | alloc after step 1 GiB | after last GiB | growth GiB/step | peak in step (first/last) GiB | median ms | earlier steps' shared V alive (max) |")
        print("|---|---|---|---|---|---|---|")
        for label, st in results.items():
            after = [s[0] for s in st]
            ms = sorted(s[2] for s in st)[len(st) // 2]
            print(f"| {label} | {after[0]:.3f} | {after[-1]:.3f} | {common.slope(after[1:]):+.5f} | "
                  f"{st[0][1]:.3f}/{st[-1][1]:.3f} | {ms:.0f} | {max(x[3] for x in st)} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
