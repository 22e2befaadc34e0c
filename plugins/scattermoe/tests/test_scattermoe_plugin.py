"""The plugin through the host: config keys and rules, registration, and a real `host train` run."""

import json

import pytest

from host.config import validate
from host.errors import ConfigError
from host.testing import base_config


def _cfg(tmp_path, **over):
    return base_config("unused-model", tmp_path / "d.jsonl", tmp_path / "out", plugins=["scattermoe"], **over)


def test_config_keys_have_defaults(make_plugin_manager, tmp_path):
    cfg = validate(_cfg(tmp_path), make_plugin_manager(["scattermoe"]))
    assert cfg.scattermoe_fused_lora is True
    assert cfg.scattermoe_split_threshold == 8_000_000 and cfg.scattermoe_backend == "auto"
    assert cfg.scattermoe_fused_tail is False and cfg.scattermoe_light_tail is None


def test_other_experts_implementation_is_an_error(make_plugin_manager, tmp_path):
    with pytest.raises(ConfigError, match="experts_implementation.*grouped_mm.*scattermoe"):
        validate(_cfg(tmp_path, experts_implementation="grouped_mm"), make_plugin_manager(["scattermoe"]))


def test_lora_dropout_on_expert_params_is_an_error(make_plugin_manager, tmp_path):
    bad = _cfg(tmp_path, lora_dropout=0.1, lora_target_parameters=["mlp.experts.gate_up_proj"])
    with pytest.raises(ConfigError, match=r"lora_dropout.*Set lora_dropout: 0"):
        validate(bad, make_plugin_manager(["scattermoe"]))
    # dropout on ordinary modules alone stays allowed
    validate(_cfg(tmp_path, lora_dropout=0.1), make_plugin_manager(["scattermoe"]))


def test_bad_key_value_names_the_key(make_plugin_manager, tmp_path):
    with pytest.raises(ConfigError, match="scattermoe_backend"):
        validate(_cfg(tmp_path, scattermoe_backend="cuda"), make_plugin_manager(["scattermoe"]))


def test_pre_model_load_registers_and_selects(make_plugin_manager, tmp_path):
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    from host_plugin_scattermoe import experts, ops

    pm = make_plugin_manager(["scattermoe"])
    cfg = validate(_cfg(tmp_path, scattermoe_fused_lora=False, scattermoe_fused_tail=True), pm)
    assert cfg.experts_implementation is None
    pm.hook.pre_model_load(cfg=cfg)
    assert cfg.experts_implementation == "scattermoe"
    assert ALL_EXPERTS_FUNCTIONS["scattermoe"] is experts.experts_forward
    assert ops.SETTINGS["fused_lora"] is False and ops.SETTINGS["fused_tail"] is True
    ops.SETTINGS.update(fused_lora=True, fused_tail=False)


@pytest.mark.parametrize("on", [True, False])
def test_fused_router_key(make_plugin_manager, tmp_path, monkeypatch, on):
    """``scattermoe_fused_router`` sets the switch and declares the fused router classes' forwards as patched targets
    (another plugin patching one of them is then a config error naming this key)."""
    from host_plugin_scattermoe import ops, router

    monkeypatch.setitem(ops.SETTINGS, "fused_router", not on)
    pm = make_plugin_manager(["scattermoe"])
    cfg = validate(_cfg(tmp_path, scattermoe_fused_router=on), pm)
    (declared,) = pm.hook.patched_targets(cfg=cfg)
    assert declared.pop("moe.experts.forward") == ""
    assert declared == ({f"{path}.forward": "scattermoe_fused_router" for path in router.SPECS} if on else {})
    assert all(path.startswith("transformers.models.") for path in router.SPECS)
    pm.hook.pre_model_load(cfg=cfg)
    assert ops.SETTINGS["fused_router"] is on


@pytest.mark.parametrize("value,setting", [("off", None), ("gemm", "gemm"), ("glu", "glu"), (False, None), (True, "glu")])
def test_light_tail_key_sets_the_backward(make_plugin_manager, tmp_path, monkeypatch, value, setting):
    """``scattermoe_light_tail`` picks the merged node's backward (YAML's unquoted ``off`` arrives as False); unset, the
    env / built-in default stays."""
    from host_plugin_scattermoe import ops

    monkeypatch.setitem(ops.SETTINGS, "light_tail", "glu")
    pm = make_plugin_manager(["scattermoe"])
    pm.hook.pre_model_load(cfg=validate(_cfg(tmp_path), pm))
    assert ops._light_mode() == "glu"
    pm.hook.pre_model_load(cfg=validate(_cfg(tmp_path, scattermoe_light_tail=value), pm))
    assert ops._light_mode() == setting
    with pytest.raises(ConfigError, match="scattermoe_light_tail"):
        validate(_cfg(tmp_path, scattermoe_light_tail="fast"), pm)
    ops.SETTINGS.update(fused_lora=True, fused_tail=False)


def test_host_train_with_plugin(run_host, write_config, tiny_model, text_file, tmp_path):
    out = tmp_path / "out"
    cfg = base_config(
        tiny_model("qwen3_moe"), text_file, out, plugins=["scattermoe"],
        lora_target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], max_steps=12,
    )
    result = run_host("train", write_config(cfg))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["plugins"] == {"scattermoe": "0.1.0"}
    assert summary["steps"] == 12
    assert summary["final_train_loss"] < summary["first_train_loss"]


def test_host_train_rejects_dropout_with_exit_code_2(run_host, write_config, tiny_model, text_file, tmp_path):
    cfg = base_config(
        tiny_model("qwen3_moe"), text_file, tmp_path / "out", plugins=["scattermoe"], lora_dropout=0.05,
        lora_target_parameters=["mlp.experts.gate_up_proj"],
    )
    result = run_host("train", write_config(cfg))
    assert result.exit_code == 2 and "lora_dropout" in result.output
