"""Peak accelerator memory and step time of one forward+backward with and without activation offloading.

    python scripts/bench_activation_offload.py [--layers 4] [--hidden 4096] [--seq 4096] [--json out.json]

A Qwen3-shaped model built from a config (random weights, bf16 on CUDA, fp32 on CPU), gradient
checkpointing on (non-reentrant), full fine-tuning, or with ``--frozen`` only the norms trained (the
memory profile of a LoRA run: no weight-sized gradients). Each mode runs in the same process after a
warm-up step; the loss and gradients of both modes are compared (a third plain step gives the run-to-run
difference of the plain mode itself: GPU backward kernels are not deterministic). Prints a table and
writes JSON (default scripts/results/activation_offload.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from host.offload import attach

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--frozen", action="store_true", help="train only the norms (a LoRA-like memory profile)")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "activation_offload.json"))
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    cfg = AutoConfig.for_model(
        "qwen3", hidden_size=a.hidden, intermediate_size=a.hidden * 3, num_hidden_layers=a.layers,
        num_attention_heads=a.hidden // 128, num_key_value_heads=min(8, a.hidden // 128), head_dim=128, vocab_size=a.vocab,
        max_position_embeddings=a.seq, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: seconds, not minutes, at real width
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if a.frozen:
        for name, p in model.named_parameters():
            p.requires_grad_("norm" in name)
        model.enable_input_require_grads()
    model.train()
    ids = torch.randint(0, a.vocab, (1, a.seq), device=device, generator=torch.Generator(device).manual_seed(1))
    off = None

    def step():
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else 0
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t) * 1e3
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None
        return loss.detach().float().item(), [p.grad.detach().clone() for p in model.parameters() if p.grad is not None], ms, peak

    rows = {}
    step()  # warm-up
    rows["plain"] = step()
    noise = max((x.float() - y.float()).abs().max().item() for x, y in zip(rows["plain"][1], step()[1]))
    off = attach(model)
    step()
    rows["offload"] = step()
    (l0, g0, ms0, p0), (l1, g1, ms1, p1) = rows["plain"], rows["offload"]
    diff = max((x.float() - y.float()).abs().max().item() for x, y in zip(g0, g1))
    dev = torch.cuda.get_device_name() if cuda else "cpu"
    out = {
        "device": dev, "dtype": str(dtype), "layers": a.layers, "hidden": a.hidden, "seq": a.seq, "vocab": a.vocab,
        "plain": {"loss": l0, "ms": round(ms0, 1), "peak_above_weights_gib": p0 and round(p0, 3)},
        "offload": {"loss": l1, "ms": round(ms1, 1), "peak_above_weights_gib": p1 and round(p1, 3),
                    "tensors_per_step": off.offloaded // 2, "mib_per_step": round(off.offloaded_bytes / 2 / 2**20, 1)},
        "trained": "norms only" if a.frozen else "all weights",
        "max_abs_grad_diff": diff, "plain_run_to_run_grad_diff": noise, "loss_equal": l0 == l1,
    }
    print(f"{dev}, {dtype}, Qwen3-shaped {a.layers} layers, hidden {a.hidden}, seq {a.seq}, {'norms only trained' if a.frozen else 'full fine-tuning'}, checkpointing on")
    print(f"{'mode':<10}{'loss':>10}{'ms/step':>10}{'peak GiB above weights':>31}")
    for name, (loss, _, ms, peak) in rows.items():
        print(f"{name:<10}{loss:>10.4f}{ms:>10.1f}{(f'{peak:.3f}' if peak is not None else '-'):>31}")
    print(f"offloaded per step: {out['offload']['tensors_per_step']} tensors, {out['offload']['mib_per_step']} MiB; "
          f"max |grad diff| {diff:.3g} (plain vs plain: {noise:.3g}); loss equal: {l0 == l1}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
