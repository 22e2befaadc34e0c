"""``scattermoe_cuda_graph``: the experts call replayed as CUDA graphs gives the eager path's loss and
gradients step after step (new inputs every step, gradient accumulation, two forwards before one
backward, a second token count, activation checkpointing with trainable expert weights). GPU only,
except the check that the CPU path never captures."""

import pytest
import torch

from host_plugin_scattermoe import experts, graphs, lora, ops
from host_plugin_scattermoe.testing import rel

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _model(model_type="qwen3_moe", lora_on=True):
    from host.testing import tiny_config
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    experts.register()
    extra = {"num_local_experts": 5, "intermediate_size": 24, "layer_types": ["sliding_attention", "full_attention"]}
    cfg = tiny_config(model_type, 96, **(extra if model_type == "gpt_oss" else {}))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to("cuda")
    if lora_on:
        lcfg = LoraConfig(r=4, lora_alpha=8, target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                          init_lora_weights=False)
        model = get_peft_model(model, lcfg)
        lora.attach(model)
    (model.base_model.model if lora_on else model).set_experts_implementation("scattermoe")
    return model


def _run(model, batches, graph, monkeypatch, zero_each=True, two_forwards=False):
    monkeypatch.setitem(ops.SETTINGS, "cuda_graph", graph)
    for m in model.modules():
        graphs.release(m)
    losses = []
    model.zero_grad(set_to_none=True)
    for ids in batches:
        if zero_each:
            model.zero_grad(set_to_none=True)
        if two_forwards:
            loss = model(input_ids=ids, labels=ids).loss + 0.5 * model(input_ids=ids.flip(1), labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach().double())
    grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}
    return losses, grads


def _same(a, b, tol=1e-5):
    (la, ga), (lb, gb) = a, b
    assert all(rel(x, y) < tol for x, y in zip(la, lb)), (la, lb)
    assert set(ga) == set(gb) and len(ga) >= 4
    for n in ga:
        assert rel(ga[n], gb[n]) < tol, (n, rel(ga[n], gb[n]))


def _batches(shape=(2, 12), n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, shape, generator=g).cuda() for _ in range(n)]


def test_cpu_never_captures(monkeypatch):
    monkeypatch.setitem(ops.SETTINGS, "cuda_graph", True)
    m = torch.nn.Module()
    assert graphs.applies(m, torch.zeros(2, 2)) is False


@cuda
def test_graph_matches_eager_over_steps(monkeypatch):
    model = _model()
    batches = _batches() + _batches((2, 8), 2, seed=2)  # a second token count: a second capture
    eager = _run(model, batches, False, monkeypatch)
    before = dict(graphs.REPLAYS)
    got = _run(model, batches, True, monkeypatch)
    _same(got, eager)
    n_layers = 2
    assert graphs.REPLAYS["fwd"] - before["fwd"] == n_layers * len(batches)
    assert graphs.REPLAYS["bwd"] - before["bwd"] == n_layers * len(batches)
    ex = [m for m in model.modules() if hasattr(m, graphs._GRAPHS_ATTR)]
    assert len(ex) == n_layers and all(len(m.__dict__[graphs._GRAPHS_ATTR]) == 2 for m in ex)
    # the graphs hold the eager path's node (the merged one, with its light tail), not the separate nodes
    nodes = {type(e.out.grad_fn).__name__ for m in ex for e in m.__dict__[graphs._GRAPHS_ATTR].values()}
    assert nodes == {"_GluExpertsFunctionBackward"}, nodes


@cuda
def test_graph_gradient_accumulation_and_two_forwards(monkeypatch):
    model = _model()
    batches = _batches(n=3, seed=3)
    _same(_run(model, batches, True, monkeypatch, zero_each=False), _run(model, batches, False, monkeypatch, zero_each=False))
    before = dict(graphs.REPLAYS)
    got = _run(model, batches, True, monkeypatch, two_forwards=True)
    _same(got, _run(model, batches, False, monkeypatch, two_forwards=True))
    assert graphs.REPLAYS["fwd"] > before["fwd"]  # the first forward of each step replays, the second runs eagerly


@cuda
@pytest.mark.parametrize("reentrant", [True, False])
def test_graph_full_finetune_with_checkpointing(monkeypatch, reentrant):
    """Trainable expert weights (dW) under activation checkpointing: reentrant checkpointing recomputes with
    grad enabled and replays; non-reentrant packs saved tensors through hooks, so the experts run eagerly."""
    model = _model("gpt_oss", lora_on=False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    batches = _batches(n=2, seed=4)
    eager = _run(model, batches, False, monkeypatch)
    before = dict(graphs.REPLAYS)
    _same(_run(model, batches, True, monkeypatch), eager)
    assert (graphs.REPLAYS["bwd"] > before["bwd"]) is reentrant
