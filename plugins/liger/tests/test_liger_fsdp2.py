"""FSDP2 shards ``lm_head`` as a unit of its own (accelerate does); the fused loss reads its weight without calling
it, so the plugin gathers the unit first. Real FSDP2 (one CPU rank, gloo) and liger's real fused loss."""

import pytest
import torch
import torch.distributed as dist

from host_plugin_liger.lm_head import unsharding_head


class _Head(torch.nn.Module):
    """Like liger's causal-LM forward in training: reads ``lm_head.weight`` and never calls ``lm_head``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(16, 16)
        self.lm_head = torch.nn.Linear(16, 40, bias=False)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, x, y):
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy(self.body(x), self.lm_head.weight, y)


@pytest.fixture
def one_rank(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29531")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fused_loss_gathers_an_fsdp2_sharded_lm_head(one_rank, monkeypatch):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    x, y = torch.randn(12, 16), torch.randint(0, 40, (12,))
    want = _Head()
    want_loss = want(x, y)
    want_loss.backward()

    model = _Head()
    mesh = init_device_mesh("cpu", (1,))
    fully_shard(model.lm_head, mesh=mesh, reshard_after_forward=False)  # as accelerate carves out the head
    fully_shard(model, mesh=mesh)
    with pytest.raises(RuntimeError, match="DTensor"):  # what the fused loss hit on 2 GPUs before the fix
        model(x, y)

    monkeypatch.setattr(_Head, "forward", unsharding_head(_Head.forward))
    model.train()
    loss = model(x, y)
    loss.backward()
    torch.testing.assert_close(loss, want_loss)
    grad = model.lm_head.weight.grad
    assert isinstance(model.lm_head.weight, DTensor)  # resharded after backward by FSDP's final callback
    torch.testing.assert_close(grad.full_tensor(), want.lm_head.weight.grad)
