"""GPU: the 4-bit base lands on this process's GPU (the Trainer never moves a quantised model),
QLoRA trains through ``host train`` in bf16, and quantised MoE experts take LoRA. Skipped without CUDA."""

from __future__ import annotations

import json

import pytest
import torch

from host.testing import base_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_qlora_bf16_on_gpu(run_host, write_config, make_plugin_manager, tiny_model, text_file, tmp_path):
    import bitsandbytes as bnb

    from host import model as model_mod
    from host.config import validate

    data = base_config(tiny_model("qwen3"), text_file, tmp_path / "o", plugins=["qlora"], adapter="qlora",
                       load_in_4bit=True, bf16=True, lora_target_modules=ATTN, max_steps=12, learning_rate=2e-2)
    pm = make_plugin_manager(["qlora"])
    model = model_mod.build(validate(data, pm), pm)[0]
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer, bnb.nn.Linear4bit) and q.base_layer.weight.device.type == "cuda"
    assert q.lora_A["default"].weight.device.type == "cuda"
    del model
    result = run_host("train", write_config(data))
    assert result.exit_code == 0, result.output
    s = json.loads((tmp_path / "o" / "run_summary.json").read_text())
    assert s["final_train_loss"] < s["first_train_loss"] - 0.05, s


def test_quantized_moe_experts_train_on_gpu(run_host, write_config, tiny_model, text_file, tmp_path):
    data = base_config(tiny_model("qwen3_moe"), text_file, tmp_path / "o", plugins=["qlora"], adapter="qlora",
                       load_in_4bit=True, bf16=True, lora_target_modules=ATTN, quantize_moe_experts=True,
                       lora_target_parameters=["experts.gate_up_proj", "experts.down_proj"], max_steps=12,
                       learning_rate=2e-2)
    result = run_host("train", write_config(data))
    assert result.exit_code == 0, result.output
    s = json.loads((tmp_path / "o" / "run_summary.json").read_text())
    assert s["final_train_loss"] < s["first_train_loss"] - 0.05, s
