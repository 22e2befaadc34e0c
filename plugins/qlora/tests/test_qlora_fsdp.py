"""QLoRA under FSDP: which combinations validate, the storage dtype the plugin hands transformers,
and (slow) a real FSDP2 sharding of the 4-bit model on two CPU processes over gloo."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from host.config import validate, validate_with_warnings
from host.errors import ConfigError
from host.testing import base_config, offline_env

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
FSDP2 = {"fsdp_version": 2, "fsdp_config": {"offload_params": False, "state_dict_type": "FULL_STATE_DICT"}}


def _cfg(tmp_path, **over):
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n')
    over = {"plugins": ["qlora"], "adapter": "qlora", "load_in_4bit": True, **FSDP2, **over}
    return base_config(tmp_path, tmp_path / "d.jsonl", tmp_path / "o", **over)


def _check(make_plugin_manager, data):
    return validate_with_warnings(data, make_plugin_manager(data.get("plugins", [])))


@pytest.mark.parametrize("over", [
    {},  # axolotl's qwen3.5 *-qlora-fsdp examples: fsdp_version 2, bf16 auto, no storage key
    {"bf16": True, "bnb_4bit_quant_storage": "bfloat16"},
    {"fsdp_version": 1, "fsdp_config": {"use_orig_params": False, "cpu_ram_efficient_loading": True}},
    {"quantize_moe_experts": True, "fsdp_config": {"offload_params": True}},
    {"gradient_checkpointing": True, "fsdp_config": {"activation_checkpointing": True}},
])
def test_qlora_with_fsdp_validates(make_plugin_manager, tmp_path, over):
    cfg, _ = _check(make_plugin_manager, _cfg(tmp_path, **over))
    assert cfg.fsdp_enabled and cfg.load_in_4bit


@pytest.mark.parametrize("over, match", [
    ({"adapter": "lora", "load_in_4bit": False, "load_in_8bit": True}, "load_in_8bit: int8 weights cannot be sharded by FSDP"),
    ({"bnb_4bit_quant_storage": "uint8"}, "bnb_4bit_quant_storage: uint8 cannot be sharded by FSDP"),
    ({"bnb_config_kwargs": {"bnb_4bit_quant_storage": "uint8"}}, "bnb_4bit_quant_storage: uint8 cannot be sharded"),
    ({"bf16": True, "bnb_4bit_quant_storage": "float32"}, "float32 differs from the training dtype \\(bfloat16\\)"),
    ({"bf16": False, "fp16": True}, "fp16: QLoRA under FSDP needs bf16"),
    ({"quantize_moe_experts": True, "fsdp_version": 1}, "quantize_moe_experts: 4-bit experts under FSDP need fsdp_version: 2"),
])
def test_combinations_that_cannot_shard_are_one_clear_error(make_plugin_manager, tmp_path, over, match):
    with pytest.raises(ConfigError, match=match):
        _check(make_plugin_manager, _cfg(tmp_path, **over))


def _init_kwargs(make_plugin_manager, data):
    from host.model import plugin_init_kwargs

    pm = make_plugin_manager(data["plugins"])
    return plugin_init_kwargs(validate(data, pm), pm, "train")


@pytest.mark.parametrize("over, storage", [
    ({"bf16": True}, torch.bfloat16),  # the training dtype under FSDP
    ({"bf16": False}, torch.float32),
    ({"bf16": "auto"}, torch.float32),  # auto on a CPU: float32 training
    ({"bf16": False, "fsdp_version": None, "fsdp_config": None}, torch.bfloat16),  # no FSDP: axolotl's default
])
def test_model_init_kwargs_store_4bit_data_in_the_training_dtype_under_fsdp(make_plugin_manager, tmp_path, over, storage):
    data = {k: v for k, v in _cfg(tmp_path, **over).items() if v is not None}
    qc = _init_kwargs(make_plugin_manager, data)["quantization_config"]
    assert qc.load_in_4bit and qc.bnb_4bit_quant_storage == storage
    assert qc.bnb_4bit_compute_dtype == (torch.bfloat16 if over["bf16"] is True else torch.float32)


def test_explicit_storage_that_bf16_auto_resolves_against_is_refused_at_load(make_plugin_manager, tmp_path):
    data = _cfg(tmp_path, bf16="auto", bnb_4bit_quant_storage="bfloat16")  # CPU: auto means float32
    with pytest.raises(ConfigError, match="bfloat16 differs from the training dtype here \\(float32\\)"):
        _init_kwargs(make_plugin_manager, data)


def test_4bit_experts_declare_the_peft_method_they_replace(make_plugin_manager, tmp_path):
    data = _cfg(tmp_path, quantize_moe_experts=True)
    pm = make_plugin_manager(data["plugins"])
    declared = [t for t in pm.hook.patched_targets(cfg=validate(data, pm)) if t]
    assert declared == [{"peft.tuners.lora.layer.ParamWrapper._remove_parametrizations": "quantize_moe_experts"}]
    data = _cfg(tmp_path)
    assert not any(pm.hook.patched_targets(cfg=validate(data, pm)))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_fsdp2_shards_the_packed_4bit_weights_and_lora_trains(tiny_model, text_file, tmp_path):
    """Dense QLoRA and quantize_moe_experts (LoRA on the 4-bit experts), each loaded by the plugin as
    for an FSDP run, then sharded with FSDP2 over two gloo processes: every packed weight is split in
    half, the first sharded loss equals the unsharded one (the gathered bytes dequantise exactly), and
    the loss falls."""
    common = {"plugins": ["qlora"], "adapter": "qlora", "load_in_4bit": True, "bf16": True, **FSDP2}
    runs = {
        "dense": base_config(tiny_model("qwen3"), text_file, tmp_path / "o1", **common,
                             lora_target_modules=ATTN + ["gate_proj", "up_proj", "down_proj"]),
        "experts": base_config(tiny_model("qwen3_moe"), text_file, tmp_path / "o2", **common, quantize_moe_experts=True,
                               lora_target_modules=ATTN, lora_target_parameters=["experts.gate_up_proj", "experts.down_proj"]),
    }
    args = []
    for name, data in runs.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(data))
        args += [str(tmp_path / f"{name}.yaml"), str(tmp_path / f"{name}.json")]
    worker = Path(__file__).with_name("fsdp2_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={_port()}", str(worker), *args]
    done = subprocess.run(cmd, env=offline_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    for name in runs:
        r = json.loads((tmp_path / f"{name}.json").read_text())
        assert r["packed"] and {d for _, d in r["packed"].values()} == {"torch.bfloat16"}, r["packed"]
        assert all(r["local_numel"][n] == numel // 2 for n, (numel, _) in r["packed"].items()), r["local_numel"]
        assert r["losses"][0] == pytest.approx(r["unsharded_loss"], rel=1e-3)
        assert r["losses"][-1] < r["losses"][0] - 0.3, r["losses"]
        if name == "experts":
            assert any(".experts." in n and n.endswith(".original") for n in r["packed"])
            # the full state dict (what the final save gathers) holds the packed experts, bit-equal to before
            # sharding, and the LoRA factors
            assert r["experts_saved"] and set(r["expert_match"]) == set(r["experts_saved"]), r
            assert all(r["expert_match"].values()) and r["lora_saved"] > 0, r
