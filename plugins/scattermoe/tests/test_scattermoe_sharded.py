"""Sharded (FSDP2 DTensor) expert weights are refused, never used as if they were whole."""

import pytest
import torch
import torch.distributed as dist

from host.testing import tiny_config


@pytest.fixture
def one_rank_group():
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_dtensor_expert_weight_is_refused(one_rank_group):
    from torch.distributed.tensor import Shard, distribute_tensor
    from transformers import AutoModelForCausalLM

    from host_plugin_scattermoe import experts

    experts.register()
    cfg = tiny_config("qwen3_moe", 64)
    cfg.experts_implementation = experts.NAME
    model = AutoModelForCausalLM.from_config(cfg)
    block = model.model.layers[0].mlp.experts
    x = torch.randn(5, cfg.hidden_size)
    idx = torch.randint(0, cfg.num_experts, (5, cfg.num_experts_per_tok))
    w = torch.rand(5, cfg.num_experts_per_tok)
    experts.experts_forward(block, x, idx, w)  # plain weights: fine
    block.gate_up_proj = torch.nn.Parameter(distribute_tensor(block.gate_up_proj.data, one_rank_group, [Shard(0)]))
    with pytest.raises(RuntimeError, match="sharded DTensor"):
        experts.experts_forward(block, x, idx, w)
