"""One rank of ``test_qlora_fsdp.py`` (launched by torchrun, 2 CPU processes over gloo).

Builds the model exactly as ``host train`` would under FSDP (the plugin's ``model_init_kwargs`` and
hooks, through ``host.model.build``), then shards it with torch's FSDP2 ``fully_shard`` the way
accelerate does (each decoder layer, then the root; bf16 mixed precision), because the host itself
refuses FSDP without CUDA. Trains LoRA for a few steps and writes what rank 0 saw as JSON.
Usage: torchrun --nproc-per-node=2 fsdp2_worker.py CONFIG.yaml OUT.json [CONFIG.yaml OUT.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def packed_params(model) -> dict[str, torch.nn.Parameter]:
    """The 4-bit packed parameters: ``Params4bit`` weights and bitsandbytes-parametrized experts."""
    return {n: p for n, p in model.named_parameters()
            if type(p).__name__ == "Params4bit" or n.endswith(".original")}


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """What accelerate gathers for ``save_model`` under FSDP2 (plain ``state_dict`` before sharding)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def shard_and_train(cfg_path: str, out_path: str) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from host import model as model_mod
    from host.config import load_config

    cfg, pm, _ = load_config(Path(cfg_path))
    model, tokenizer, _ = model_mod.build(cfg, pm)
    torch.manual_seed(0)
    ids = torch.randint(3, len(tokenizer), (2, 24))
    with torch.no_grad():
        unsharded_loss = model(input_ids=ids, labels=ids).loss.item()
    packed = {n: (p.numel(), str(p.dtype)) for n, p in packed_params(model).items()}
    experts = {n: p.detach().clone() for n, p in packed_params(model).items() if ".experts." in n}

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.get_base_model().model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    local = {n: p.to_local().numel() for n, p in model.named_parameters() if n in packed}

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    # the host's final save gathers the full state dict: the packed experts come back whole, bit-equal
    saved = full_state_dict(model)
    expert_match = {n: bool(torch.equal(saved[n].view(torch.int16), w.view(torch.int16)))  # bytes: NaN patterns
                    for n, w in experts.items() if n in saved}
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps({
            "unsharded_loss": unsharded_loss, "losses": losses, "packed": packed, "local_numel": local,
            "experts_saved": sorted(experts), "expert_match": expert_match,
            "lora_saved": sum("lora_" in n for n in saved),
        }))
    dist.barrier()


if __name__ == "__main__":
    dist.init_process_group("gloo")
    args = sys.argv[1:]
    for i in range(0, len(args), 2):
        shard_and_train(args[i], args[i + 1])
    dist.destroy_process_group()
