"""DeepSpeed and FSDP keys in axolotl's terms: what can be checked without a GPU."""

import json
from pathlib import Path

import pytest

from host.testing import base_config

ZERO = Path(__file__).resolve().parents[1] / "examples" / "deepspeed"


def _out(run_host, path):
    result = run_host("validate", path)
    assert "Traceback" not in result.output
    return result


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json"])
def test_shipped_zero_configs_validate(run_host, write_config, tmp_path, name):
    pytest.importorskip("deepspeed")
    result = _out(run_host, write_config(base_config("m", "d.jsonl", tmp_path / "o", deepspeed=str(ZERO / name))))
    assert result.exit_code == 0, result.output
    assert f"deepspeed: {ZERO / name}" in result.output


def test_deepspeed_bad_inputs_all_reported(run_host, write_config, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    z3 = tmp_path / "z3.json"
    z3.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 4}))
    out = _out(run_host, write_config(base_config("m", "d.jsonl", tmp_path / "o", deepspeed=str(tmp_path / "missing.json")), "a.yaml")).output
    assert "missing.json' is not a file" in out
    out = _out(run_host, write_config(base_config("m", "d.jsonl", tmp_path / "o", deepspeed=str(bad)), "b.yaml")).output
    assert "bad.json' is not valid JSON" in out
    result = _out(run_host, write_config(base_config("m", "d.jsonl", tmp_path / "o", deepspeed=str(z3), fsdp_config={}), "c.yaml"))
    assert result.exit_code == 2
    for needle in ("deepspeed/fsdp: both shard the model", "gather_16bit_weights_on_model_save: true",
                   "train_micro_batch_size_per_gpu is 4 but the config says 2"):
        assert needle in result.output, needle


def test_deepspeed_on_cpu_is_refused_before_loading(run_host, write_config, tmp_path):
    pytest.importorskip("deepspeed")
    result = run_host("train", write_config(base_config("m", "d.jsonl", tmp_path / "o", deepspeed=str(ZERO / "zero2.json"))))
    assert result.exit_code == 2 and "DeepSpeed needs CUDA GPUs" in result.output


def test_fsdp_config_in_axolotl_terms(write_config, tmp_path):
    from host.config import load_config
    from host.train import fsdp_plugin_config

    fsdp_config = {
        "fsdp_version": 2,
        "fsdp_offload_params": True,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_transformer_layer_cls_to_wrap": "Qwen3DecoderLayer",
        "fsdp_state_dict_type": "FULL_STATE_DICT",
        "final_state_dict_type": "FULL_STATE_DICT",
        "reshard_after_forward": True,
        "cpu_ram_efficient_loading": None,
    }
    cfg, _, _ = load_config(write_config(base_config("m", "d.jsonl", tmp_path / "o", fsdp_config=fsdp_config, gradient_checkpointing=True)))
    fc = fsdp_plugin_config(cfg)
    assert fc["cpu_offload"] is True and fc["activation_checkpointing"] is True and fc["version"] == 2
    assert fc["state_dict_type"] == "FULL_STATE_DICT" and fc["transformer_layer_cls_to_wrap"] == "Qwen3DecoderLayer"
    assert "final_state_dict_type" not in fc and "offload_params" not in fc


def test_fsdp_cpu_offload_selects_a_backend_with_cpu_collectives(write_config, tmp_path):
    """accelerate picks cuda:nccl,cpu:gloo (needed to clip CPU-offloaded gradients) only from these variables."""
    from host.config import load_config
    from host.train import fsdp_environment, fsdp_plugin_config

    for offload, expected in ((True, {"ACCELERATE_USE_FSDP": "true", "FSDP_OFFLOAD_PARAMS": "true"}), (False, {})):
        cfg, _, _ = load_config(write_config(base_config("m", "d.jsonl", tmp_path / "o", fsdp_config={"offload_params": offload}), f"{offload}.yaml"))
        assert fsdp_environment(fsdp_plugin_config(cfg)) == expected


def test_fsdp_offload_params_alias_and_conflicts(run_host, write_config, tmp_path):
    cfg = base_config("m", "d.jsonl", tmp_path / "o", fsdp_config={"offload_params": True, "cpu_offload": False})
    result = _out(run_host, write_config(cfg))
    assert result.exit_code == 2 and "disagree" in result.output
    cfg = base_config("m", "d.jsonl", tmp_path / "o", fsdp_config={"final_state_dict_type": "SHARDED_STATE_DICT"})
    result = _out(run_host, write_config(cfg, "b.yaml"))
    assert result.exit_code == 2 and "final_state_dict_type" in result.output
