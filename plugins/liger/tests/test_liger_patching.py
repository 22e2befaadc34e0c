"""Patching decisions and numerics on tiny real transformers models (CPU: Triton interpreter, fp32).

Each test runs the real lifecycle (``host.model.build``: pre_model_load, from_pretrained, peft,
post_model_build) and compares loss and gradients against the same weights without the plugin.
"""

import zlib

import pytest
import torch

from host.config import validate
from host.model import build
from host_plugin_liger import patching

FLCE = "liger_fused_linear_cross_entropy"
ALL_KEYS = {"liger_rope": True, "liger_rms_norm": True, "liger_glu_activation": True, FLCE: True}


def _build(make_plugin_manager, model_dir, plugins, **keys):
    data = {"base_model": str(model_dir), "plugins": plugins, "bf16": False, **keys}
    pm = make_plugin_manager(plugins)
    cfg = validate(data, pm)
    model, _, _ = build(cfg, pm)
    return model


def _batch(vocab, seed=0, rows=2, length=16, packed=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, length), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # prompt tokens, as a chat template would mask
    batch = {"input_ids": ids, "labels": labels}
    if packed:  # as host's sample packing builds rows: positions restart per document, -100 on each first token
        split = length // 2 - 1
        batch["position_ids"] = torch.cat([torch.arange(split), torch.arange(length - split)]).repeat(rows, 1)
        labels[:, [0, split]] = -100
    return batch


def _loss_and_grads(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return out.loss.detach(), grads


def _assert_close(got, want, rtol=1e-4, atol=1e-5):
    (lg, gg), (lw, gw) = got, want
    torch.testing.assert_close(lg, lw, rtol=rtol, atol=atol)
    assert gg.keys() == gw.keys() and gw, (sorted(gg)[:5], sorted(gw)[:5])
    for name in gw:
        torch.testing.assert_close(gg[name], gw[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("model_type, glu", [("qwen3", True), ("llama", True), ("qwen3_moe", False), ("gpt_oss", False)])
def test_keys_match_plain_model(make_plugin_manager, tiny_model, model_type, glu):
    """rope + rms_norm (+ glu) + fused linear CE: same loss and (full fine-tuning) grads as transformers.

    Mistral and Mixtral run the same liger kernels as Llama and Qwen3-MoE. liger's fused MoE experts
    (glu on MoE families) autotune over several configs, which Triton's interpreter cannot run, and
    gpt-oss has no liger GLU: those are checked on the GPU (bench/gpu_check.py, bench_liger.py)."""
    keys = {**ALL_KEYS, "liger_glu_activation": glu}
    path = tiny_model(model_type)
    batch = _batch(512, packed=model_type == "qwen3")  # Qwen3 on a packed batch (two documents per row)
    torch.manual_seed(0)
    plain = _loss_and_grads(_build(make_plugin_manager, path, []), batch)
    model = _build(make_plugin_manager, path, ["liger"], **keys)
    names = {type(m).__name__ for m in model.modules()}
    assert "LigerRMSNorm" in names and ("LigerSwiGLUMLP" in names) == glu, names
    assert type(model).forward.__module__.startswith("liger_kernel.")
    _assert_close(_loss_and_grads(model, batch), plain)
    patching.restore()
    names = {type(m).__name__ for m in _build(make_plugin_manager, path, []).modules()}
    assert not any(n.startswith("Liger") for n in names), "restore() left liger classes in transformers"


def test_only_requested_patches_happen(make_plugin_manager, tiny_model):
    from transformers.models.qwen3 import modeling_qwen3

    rope, mlp = modeling_qwen3.apply_rotary_pos_emb, modeling_qwen3.Qwen3MLP
    model = _build(make_plugin_manager, tiny_model("qwen3"), ["liger"], liger_rms_norm=True)
    assert modeling_qwen3.apply_rotary_pos_emb is rope and modeling_qwen3.Qwen3MLP is mlp
    assert type(model).forward is modeling_qwen3.Qwen3ForCausalLM.forward
    assert not type(model).forward.__module__.startswith("liger_kernel.")
    assert sum(type(m).__name__ == "LigerRMSNorm" for m in model.modules()) == 2 * 4 + 1  # 4 per layer + final


@pytest.mark.parametrize("target", ["lora", "frozen"])
def test_fused_loss_with_lora_on_lm_head_or_frozen_head(make_plugin_manager, tiny_model, target, monkeypatch):
    """LoRA on lm_head: the fused loss must see W + B·A and give lora_B/lora_A of lm_head their gradient."""
    path = tiny_model("qwen3")
    modules = ["q_proj", "v_proj"] + (["lm_head"] if target == "lora" else [])
    lora = {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_modules": modules}
    batch = _batch(512, seed=1)

    def run(plugins, **keys):
        torch.manual_seed(0)
        model = _build(make_plugin_manager, path, plugins, **lora, **keys)
        for n, p in model.named_parameters():  # lora_B starts at zero: make the update visible
            if "lora_B" in n:  # seeded by name (crc32: str hash() changes per process), lm_head's update large
                std = 0.5 if "lm_head" in n else 0.02
                torch.nn.init.normal_(p, std=std, generator=torch.Generator().manual_seed(zlib.crc32(n.encode())))
        return model

    plain = _loss_and_grads(run([]), batch)
    fused_model = run(["liger"], **{FLCE: True})
    fused = _loss_and_grads(fused_model, batch)
    _assert_close(fused, plain)
    if target == "lora":
        assert any("lm_head.lora_B" in n for n in fused[1])
        # liger-kernel alone reads the base weight: the LoRA update would be lost from the loss
        head = fused_model.get_base_model().lm_head
        monkeypatch.setattr(type(head), "weight", property(lambda self: self.get_base_layer().weight))
        fused_model.zero_grad(set_to_none=True)
        loss = fused_model(**batch).loss
        assert abs(loss.item() - plain[0].item()) > 1e-2, (loss.item(), plain[0].item())


def test_gradient_checkpointing_and_lora_on_experts(make_plugin_manager, tiny_model):
    path = tiny_model("qwen3_moe", num_hidden_layers=1)
    keys = {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_modules": ["q_proj", "v_proj"],
            "lora_target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}
    batch = _batch(512, seed=2, length=16)

    def run(plugins, **extra):
        torch.manual_seed(0)  # LoRA A is drawn from the global RNG
        model = _build(make_plugin_manager, path, plugins, **keys, **extra)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(n)))
        return _loss_and_grads(model, batch)

    _assert_close(run(["liger"], liger_rms_norm=True, liger_rope=True, **{FLCE: True}), run([]))


@pytest.mark.parametrize("model_type, extra, dense", [
    ("qwen3_moe", {"decoder_sparse_step": 2, "num_hidden_layers": 2}, 1),  # layer 0 dense, layer 1 routed
    ("qwen3_5_moe_text", {"num_hidden_layers": 2}, 2),  # a shared expert per layer (one linear-attention layer)
])
def test_glu_on_dense_and_shared_mlps_when_experts_are_owned_elsewhere(make_plugin_manager, tiny_tokenizer, tmp_path,
                                                                       model_type, extra, dense):
    """The order liger and an experts kernel (scattermoe, or experts_implementation as here) agree on: the
    routed experts stay the owner's, liger's SwiGLU replaces the dense MLPs / shared experts, same numbers."""
    from transformers import AutoModelForCausalLM

    from host.testing import tiny_config

    cfg = tiny_config(model_type, len(tiny_tokenizer), **extra)
    if model_type.startswith("qwen3_5"):
        cfg.layer_types = ["linear_attention", "full_attention"]
    torch.manual_seed(0)
    path = tmp_path / model_type
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    batch = _batch(512, seed=3)
    keys = {"experts_implementation": "eager"}
    torch.manual_seed(0)
    plain = _loss_and_grads(_build(make_plugin_manager, path, [], **keys), batch)
    model = _build(make_plugin_manager, path, ["liger"], liger_glu_activation=True, **keys)
    kinds = [type(m).__name__ for m in model.modules()]
    assert kinds.count("LigerQwen3MoeSwiGLUMLP") == dense and "LigerExperts" not in kinds, kinds
    _assert_close(_loss_and_grads(model, batch), plain)
    patching.restore()
