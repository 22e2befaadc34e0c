"""``scattermoe_cuda_graph``: the MoE block (or, where the block cannot be captured, the experts call) replayed as
CUDA graphs gives the eager path's loss and gradients step after step (new inputs every step, gradient accumulation,
two forwards before one backward, a second token count, activation checkpointing with trainable expert weights, a
shared expert with its own LoRA, autocast, a forward hook inside the block). GPU only, except the checks that the CPU
path never captures and that install wraps each block once."""

import pytest
import torch

from host_plugin_scattermoe import experts, graphs, lora, ops, router
from host_plugin_scattermoe.testing import rel

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _model(model_type="qwen3_moe", lora_on=True, device="cuda"):
    from host.testing import tiny_config
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    experts.register()
    extra = {"num_local_experts": 5, "intermediate_size": 24, "layer_types": ["sliding_attention", "full_attention"]}
    cfg = tiny_config(model_type, 96, **(extra if model_type == "gpt_oss" else {}))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(device)
    if lora_on:
        # qwen2_moe: LoRA on its shared expert's Linear layers too (the experts' are parameters, not modules)
        shared = ["up_proj", "down_proj"] if model_type == "qwen2_moe" else None
        lcfg = LoraConfig(r=4, lora_alpha=8, target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                          target_modules=shared, init_lora_weights=False)
        model = get_peft_model(model, lcfg)
        lora.attach(model)
    (model.base_model.model if lora_on else model).set_experts_implementation("scattermoe")
    router.install(model)
    graphs.install(model)
    return model


def _nodes(entry) -> set:
    """The autograd node names reachable from a captured graph's outputs."""
    seen, todo = set(), [o.grad_fn for o in entry.outs if o is not None and o.grad_fn is not None]
    while todo:
        n = todo.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        todo.extend(f for f, _ in n.next_functions)
    return {type(n).__name__ for n in seen}


def _captured(model) -> list:
    """The modules holding captured graphs (the blocks, or the experts where a block could not be captured)."""
    return [m for m in model.modules() if m.__dict__.get(graphs._GRAPHS_ATTR)]


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


def test_a_failed_capture_runs_eagerly_from_then_on(monkeypatch):
    """A capture that CUDA refuses (a RuntimeError from the capture) is not the user's problem: one warning, that call
    and every later one eager (the first is the caller's fallback: ``_replay`` returns None)."""

    class Refused:
        def __init__(self, *a):
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    monkeypatch.setattr(graphs, "_Entry", Refused)
    monkeypatch.setattr(graphs, "_FAILED", None)
    monkeypatch.setitem(ops.SETTINGS, "cuda_graph", True)
    m = torch.nn.Linear(2, 2)
    with pytest.warns(UserWarning, match="capture of Linear failed .*runs eagerly"):
        assert graphs._replay(m, m, (torch.zeros(1, 2),), list(m.parameters()), (), None) is None
    assert "previous error during capture" in graphs._FAILED
    x = torch.zeros(2, 2)
    # applies() past its CPU checks
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert graphs.applies(m, x) is False
    monkeypatch.setattr(graphs, "_FAILED", None)
    assert graphs.applies(m, x) is True


def test_install_wraps_each_block_once(monkeypatch):
    """The module whose child is the experts (peft-wrapped or not) gets the replaying forward, once; on the CPU it
    runs the block's own forward, with the same result."""
    model = _model(device="cpu")
    assert graphs.install(model) == 0
    blocks = [m for m in model.modules() if "forward" in m.__dict__ and graphs._OWN_FORWARD in m.__dict__]
    assert [type(b).__name__ for b in blocks] == ["Qwen3MoeSparseMoeBlock"] * 2
    ids = torch.randint(0, 96, (2, 7))
    ref = model(input_ids=ids).logits
    for b in blocks:
        b.__dict__.pop("forward")  # the class's forward again
    monkeypatch.setitem(ops.SETTINGS, "cuda_graph", True)
    assert torch.equal(model(input_ids=ids).logits, ref)


def test_block_forward_hands_over_every_adapter_parameter(monkeypatch):
    """What the block's forward passes to a capture, on the CPU (the capture itself recorded, not run): the block's
    parameters, again after peft's ``add_adapter`` put new ones inside the same modules; with a forward hook inside the
    block only the experts call is offered."""
    from peft import LoraConfig

    model = _model(device="cpu")
    offered = []
    monkeypatch.setattr(graphs, "applies", lambda m, x: True)
    monkeypatch.setattr(graphs, "_replay", lambda m, fn, args, params, *a: offered.append((type(m).__name__, len(params))))
    ids = torch.randint(0, 96, (1, 5))
    model(input_ids=ids)
    blocks = [n for n, k in offered if n.endswith("Block")]
    assert blocks and all(k == 7 for n, k in offered if n.endswith("Block"))  # gate, 2 expert weights, 4 LoRA factors
    offered.clear()
    model.add_adapter("second", LoraConfig(r=4, target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    model(input_ids=ids)
    assert all(k == 11 for n, k in offered if n.endswith("Block")) and len(offered) >= len(blocks)
    offered.clear()
    gate = next(m for m in model.modules() if type(m).__name__.endswith("TopKRouter"))
    gate.register_forward_hook(lambda *a: None)
    model(input_ids=ids)
    names = [n for n, _ in offered]
    assert names.count("Qwen3MoeSparseMoeBlock") == len(blocks) - 1 and "Qwen3MoeExperts" in names


@cuda
@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe"])
def test_graph_matches_eager_over_steps(monkeypatch, model_type):
    """The whole block is captured (qwen2_moe: with its gated shared expert, LoRA on it too), router included."""
    model = _model(model_type)
    batches = _batches() + _batches((2, 8), 2, seed=2)  # a second token count: a second capture
    eager = _run(model, batches, False, monkeypatch)
    before = dict(graphs.REPLAYS)
    got = _run(model, batches, True, monkeypatch)
    _same(got, eager)
    n_layers = 2
    assert graphs.REPLAYS["fwd"] - before["fwd"] == n_layers * len(batches)
    assert graphs.REPLAYS["bwd"] - before["bwd"] == n_layers * len(batches)
    held = _captured(model)
    assert [type(m).__name__.endswith("SparseMoeBlock") for m in held] == [True] * n_layers
    assert all(len(m.__dict__[graphs._GRAPHS_ATTR]) == 2 for m in held)
    # the graphs hold the eager path's merged experts node (with its light tail), and the fused router's node where
    # the router's input needs a gradient (from the second layer on: the first layer's input is frozen)
    nodes = [_nodes(e) for m in held for e in m.__dict__[graphs._GRAPHS_ATTR].values()]
    assert all("_GluExpertsFunctionBackward" in n for n in nodes), nodes
    assert sum("_RouterFunctionBackward" in n for n in nodes) == 2, nodes  # layer 2, both token counts


@cuda
def test_a_hook_inside_the_block_replays_the_experts_alone(monkeypatch):
    """transformers' output recorders are forward hooks on the router: a replayed block would skip them, so the block
    runs its own forward (the hook sees every call) and only the experts call is replayed."""
    model = _model()
    batches = _batches(n=2, seed=5)
    eager = _run(model, batches, False, monkeypatch)
    seen = []
    gates = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    handles = [g.register_forward_hook(lambda mod, a, out: seen.append(out[0].shape)) for g in gates]
    try:
        got = _run(model, batches, True, monkeypatch)
    finally:
        for h in handles:
            h.remove()
    _same(got, eager)
    assert len(seen) == len(gates) * len(batches)
    held = _captured(model)
    assert held and all(type(m).__name__.endswith("Experts") for m in held)


@cuda
def test_graph_under_autocast(monkeypatch):
    """An fp32 model under bf16 autocast (HF Trainer's ``bf16: true``): the block is captured under the same autocast,
    and gives the eager path's loss and gradients."""
    model = _model()

    def run(graph):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return _run(model, _batches(n=3, seed=6), graph, monkeypatch)

    eager = run(False)
    _same(run(True), eager, tol=1e-3)
    assert any(type(m).__name__.endswith("SparseMoeBlock") for m in _captured(model))


@cuda
def test_graph_gradient_accumulation(monkeypatch):
    model = _model()
    batches = _batches(n=3, seed=3)
    _same(_run(model, batches, True, monkeypatch, zero_each=False), _run(model, batches, False, monkeypatch, zero_each=False))


@cuda
def test_graph_two_forwards(monkeypatch):
    model = _model()
    batches = _batches(n=3, seed=3)
    before = dict(graphs.REPLAYS)
    got = _run(model, batches, True, monkeypatch, two_forwards=True)
    _same(got, _run(model, batches, False, monkeypatch, two_forwards=True))
    assert graphs.REPLAYS["fwd"] > before["fwd"]  # the first forward of each step replays, the second runs eagerly
    # eagerly all through: no experts graph is captured beside the busy block's
    assert all(type(m).__name__.endswith("SparseMoeBlock") for m in _captured(model))


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
