"""Shared pieces of the Gemma 4 GPU benchmarks (real-width config, training loop, memory probes)."""

from __future__ import annotations

import time

import torch

# Real width (Gemma 4 E4B-like attention/MLP: hidden 2560, 8 q heads of 256, global layers head_dim 512),
# few layers, KV sharing on (the last 2 layers reuse the K/V of the last sliding and the last full layer).
REAL = dict(layers=6, hidden=2560, heads=8, kv_heads=2, head_dim=256, global_head_dim=512, kv_shared=2,
            per_layer_input=256, sliding_window=512, intermediate_size=10240)
SMOKE = dict(layers=6, hidden=64, heads=4, kv_heads=2, head_dim=16, global_head_dim=32, kv_shared=2,
             per_layer_input=16, sliding_window=8)


def build(smoke: bool, device, dtype, seed: int = 0, attn: str = "sdpa", vocab: int = 32768):
    from transformers import AutoModelForCausalLM

    from host_plugin_gemma4 import tiny

    torch.manual_seed(seed)
    cfg = tiny.text_config(512 if smoke else vocab, **(SMOKE if smoke else REAL))
    with torch.device(device):  # initialise on the target device (fast on a GPU)
        m = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype)
    return m.to(device)


def plugin_cfg(**kw):
    from types import SimpleNamespace

    import host_plugin_gemma4 as plugin

    d = dict(gradient_checkpointing=True, **plugin.Gemma4Config().model_dump())
    d.update(kw)
    return SimpleNamespace(**d)


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def mem(device):
    if str(device).startswith("cuda"):
        return torch.cuda.memory_allocated(device) / 2**30, torch.cuda.max_memory_allocated(device) / 2**30
    return 0.0, 0.0


def train_steps(m, steps, seq, device, vocab, batch=1, lr=1e-4, on_step=None):
    """Plain checkpointed training steps; returns per-step (allocated_after_GiB, peak_in_step_GiB, ms)."""
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator(device="cpu").manual_seed(0)
    out = []
    for _ in range(steps):
        ids = torch.randint(3, vocab, (batch, seq), generator=g).to(device)
        if str(device).startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t = time.perf_counter()
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del loss
        sync(device)
        ms = (time.perf_counter() - t) * 1e3
        out.append((*mem(device), ms))
        if on_step is not None:
            on_step(len(out) - 1)
    return out


def track_shared_v(m):
    """weakrefs to every V tensor the 'store' layers put in the shared K/V container, per step.

    Returns (refs, step) where refs[s] lists the weakrefs of step s; set step[0] before each step."""
    import weakref

    refs, step = {}, [0]

    def hook(mod, inp, out):
        refs.setdefault(step[0], []).append(weakref.ref(out))

    for layer in m.model.layers:
        if layer.self_attn.store_full_length_kv:
            layer.self_attn.v_norm.register_forward_hook(hook)
    return refs, step


def slope(values):
    """Least-squares growth per step (same unit as values)."""
    n = len(values)
    if n < 2:
        return 0.0
    xm = (n - 1) / 2
    ym = sum(values) / n
    return sum((i - xm) * (v - ym) for i, v in enumerate(values)) / sum((i - xm) ** 2 for i in range(n))
