"""QLoRA end to end on CPU with the real bitsandbytes (its CPU backend): the base loads quantised,
LoRA trains through ``host train`` and its loss falls, merge-lora writes a dense model."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from host.config import validate
from host.testing import base_config

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def _build(make_plugin_manager, data):
    from host import model as model_mod

    pm = make_plugin_manager(data["plugins"])
    cfg = validate(data, pm)
    return model_mod.build(cfg, pm)[0]


def _qlora(model_dir, text_file, out, **over):
    over = {"plugins": ["qlora"], "adapter": "qlora", "load_in_4bit": True, "bf16": False,
            "lora_target_modules": ATTN + ["gate_proj", "up_proj", "down_proj"], "max_steps": 10,
            "learning_rate": 2e-2, **over}
    return base_config(model_dir, text_file, out, **over)


def test_base_loads_in_4bit_and_only_lora_trains(make_plugin_manager, tiny_model, text_file, tmp_path):
    import bitsandbytes as bnb

    model = _build(make_plugin_manager, _qlora(tiny_model("qwen3"), text_file, tmp_path / "o"))
    base = model.get_base_model()
    q = base.model.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer, bnb.nn.Linear4bit) and q.base_layer.weight.quant_state.quant_type == "nf4"
    assert q.base_layer.weight.dtype == torch.bfloat16  # bnb_4bit_quant_storage (axolotl's default)
    assert base.is_loaded_in_4bit and base.config.quantization_config.bnb_4bit_use_double_quant
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def _losses_fall(out):
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["final_train_loss"] < summary["first_train_loss"] - 0.05, summary


def test_qlora_trains_through_host_train_then_merges(run_host, write_config, tiny_model, text_file, tmp_path):
    """One real run covers training (with gradient checkpointing: the host's input-gradient step
    must reach a 4-bit base) and merge-lora, which loads the base dense and folds LoRA in."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "o"
    path = write_config(_qlora(tiny_model("qwen3"), text_file, out, gradient_checkpointing=True))
    result = run_host("train", path)
    assert result.exit_code == 0, result.output
    _losses_fall(out)
    assert set(json.loads((out / "adapter_config.json").read_text())["target_modules"]) >= set(ATTN)
    result = run_host("merge-lora", path)
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert getattr(merged.config, "quantization_config", None) is None
    base = AutoModelForCausalLM.from_pretrained(tiny_model("qwen3"))
    w, w0 = merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight
    assert w.dtype == torch.float32 and w.shape == w0.shape and not torch.equal(w, w0)  # LoRA folded into dense


def test_lora_on_int8_base_trains(run_host, write_config, make_plugin_manager, tiny_model, text_file, tmp_path):
    import bitsandbytes as bnb

    data = _qlora(tiny_model("qwen3"), text_file, tmp_path / "o", adapter="lora", load_in_4bit=False, load_in_8bit=True)
    model = _build(make_plugin_manager, data)
    assert isinstance(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear8bitLt)
    result = run_host("train", write_config(data))
    assert result.exit_code == 0, result.output
    _losses_fall(tmp_path / "o")


def test_moe_experts_stay_dense_and_take_lora(make_plugin_manager, tiny_model, text_file, tmp_path, caplog):
    import bitsandbytes as bnb

    data = _qlora(tiny_model("qwen3_moe"), text_file, tmp_path / "o", lora_target_modules=ATTN,
                  lora_target_parameters=EXPERTS)
    with caplog.at_level(logging.WARNING, logger="host.qlora"):
        model = _build(make_plugin_manager, data)
    assert "stay in float32" in caplog.text
    layer = model.get_base_model().model.layers[0]
    assert isinstance(layer.self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    dense = [(n, p.dtype) for n, p in model.named_parameters() if n.endswith(("experts.base_layer.base_layer.gate_up_proj",
                                                                             "experts.base_layer.base_layer.down_proj"))]
    assert len(dense) == 2 * model.config.num_hidden_layers and {d for _, d in dense} == {torch.float32}
    lora = [n for n, p in model.named_parameters() if p.requires_grad and ".experts." in n and "lora_" in n]
    assert len(lora) == 2 * 2 * model.config.num_hidden_layers  # lora_A + lora_B per expert parameter


def test_quantize_moe_experts_true_quantizes_them_and_lora_trains(run_host, write_config, make_plugin_manager,
                                                                   tiny_model, text_file, tmp_path):
    from host_plugin_qlora import experts as qexperts

    data = _qlora(tiny_model("qwen3_moe"), text_file, tmp_path / "o", lora_target_modules=ATTN,
                  lora_target_parameters=EXPERTS, quantize_moe_experts=True)
    model = _build(make_plugin_manager, data)
    quantized = qexperts.expert_params_quantized(model)
    assert len(quantized) == 2 * model.config.num_hidden_layers
    lora = [n for n, p in model.named_parameters() if p.requires_grad and "experts" in n]
    assert lora, "peft found no expert parameter to put LoRA on"
    result = run_host("train", write_config(data))
    assert result.exit_code == 0, result.output
    _losses_fall(tmp_path / "o")
    result = run_host("merge-lora", write_config(data))
    assert result.exit_code == 2 and "not supported" in result.output
