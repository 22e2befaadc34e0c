"""Config keys and rules of the qlora plugin (axolotl's names and meanings); no model is loaded."""

from __future__ import annotations

import json

import pytest

from host.config import validate_with_warnings
from host.errors import ConfigError
from host.testing import base_config


def _cfg(tmp_path, **over):
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n')
    return base_config(tmp_path, tmp_path / "d.jsonl", tmp_path / "o", plugins=["qlora"], **over)


def _check(make_plugin_manager, data):
    return validate_with_warnings(data, make_plugin_manager(data.get("plugins", [])))


def test_qlora_keys_validate_with_axolotl_defaults(make_plugin_manager, tmp_path):
    cfg, warnings = _check(make_plugin_manager, _cfg(tmp_path, adapter="qlora", load_in_4bit=True))
    assert (cfg.adapter, cfg.load_in_4bit, cfg.load_in_8bit) == ("qlora", True, False)
    assert (cfg.bnb_4bit_quant_type, cfg.bnb_4bit_use_double_quant) == ("nf4", True)
    assert cfg.bnb_4bit_quant_storage is None  # unset: bfloat16 (axolotl's), under FSDP the training dtype
    assert warnings == []


def test_qlora_adapter_kind_needs_the_plugin(make_plugin_manager, tmp_path):
    data = _cfg(tmp_path, adapter="qlora")
    data["plugins"] = []
    with pytest.raises(ConfigError, match="adapter: 'qlora' needs host plugin `qlora`: add qlora to `plugins:`"):
        _check(make_plugin_manager, data)


def test_axolotl_qlora_config_without_the_plugin_names_it_once_per_key(make_plugin_manager, tmp_path):
    data = _cfg(tmp_path, adapter="qlora", load_in_4bit=True, bnb_4bit_quant_type="nf4", load_in_8bit=False)
    data["plugins"] = []
    with pytest.raises(ConfigError) as err:
        _check(make_plugin_manager, data)
    msg = str(err.value)
    for key in ("load_in_4bit", "bnb_4bit_quant_type"):
        assert f"axolotl key `{key}` needs host plugin `qlora`" in msg
    assert "adapter: 'qlora' needs host plugin `qlora`" in msg
    assert "load_in_8bit`" not in msg  # false is axolotl's no-op: a warning, not an error


@pytest.mark.parametrize(
    "over, match",
    [
        ({"adapter": "qlora"}, "needs load_in_4bit: true"),
        ({"adapter": "qlora", "load_in_8bit": True}, "adapter: qlora is 4-bit"),
        ({"adapter": None, "load_in_4bit": True}, "can only be trained through an adapter"),
        ({"adapter": "qlora", "load_in_4bit": True, "load_in_8bit": True}, "set one of them, not both"),
        ({"adapter": "qlora", "load_in_4bit": True, "bnb_config_kwargs": {"bnb_4bit_quant_typ": "nf4"}},
         "unknown BitsAndBytesConfig argument.*bnb_4bit_quant_typ"),
        ({"adapter": "qlora", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4",
          "bnb_config_kwargs": {"bnb_4bit_quant_type": "nf4"}}, "also set as top-level"),
        ({"adapter": "lora", "load_in_8bit": True, "fsdp_version": 2, "fsdp_config": {}}, "int8 weights cannot be sharded by FSDP"),
        ({"adapter": "lora", "load_in_8bit": True, "quantize_moe_experts": True}, "no int8 one.*mxfp4"),
        ({"adapter": "qlora", "load_in_4bit": True, "bnb_4bit_quant_type": "int4"}, "bnb_4bit_quant_type"),
    ],
)
def test_impossible_combinations_are_one_clear_error(make_plugin_manager, tmp_path, over, match):
    with pytest.raises(ConfigError, match=match):
        _check(make_plugin_manager, _cfg(tmp_path, **over))


def test_warnings(make_plugin_manager, tmp_path):
    _, w = _check(make_plugin_manager, _cfg(tmp_path, adapter="lora", load_in_4bit=True))
    assert any("not quantised" in x and "adapter: qlora" in x for x in w)
    _, w = _check(make_plugin_manager, _cfg(tmp_path))
    assert any("does nothing" in x for x in w)


def test_moe_base_model_warns_that_experts_stay_dense(make_plugin_manager, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "num_experts": 8}))
    _, w = _check(make_plugin_manager, _cfg(tmp_path, adapter="qlora", load_in_4bit=True))
    assert any("8 experts per layer" in x and "quantize_moe_experts: true" in x for x in w)
    _, w = _check(make_plugin_manager, _cfg(tmp_path, adapter="qlora", load_in_4bit=True, quantize_moe_experts=True))
    assert not any("experts per layer" in x for x in w)


def test_bnb_config_follows_axolotl_defaults_and_overrides(make_plugin_manager, tmp_path):
    import torch

    from host_plugin_qlora import bnb_config

    cfg, _ = _check(make_plugin_manager, _cfg(tmp_path, adapter="qlora", load_in_4bit=True, bf16=True,
                                             bnb_config_kwargs={"llm_int8_skip_modules": ["lm_head"]}))
    q = bnb_config(cfg)
    assert q.load_in_4bit and not q.load_in_8bit
    assert (q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant) == ("nf4", True)
    assert (q.bnb_4bit_compute_dtype, q.bnb_4bit_quant_storage) == (torch.bfloat16, torch.bfloat16)
    assert q.llm_int8_skip_modules == ["lm_head"]
    cfg, _ = _check(make_plugin_manager, _cfg(tmp_path, adapter="qlora", load_in_4bit=True, bf16=False,
                                             bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype="float16"))
    q = bnb_config(cfg)
    assert (q.bnb_4bit_quant_type, q.bnb_4bit_compute_dtype) == ("fp4", torch.float16)
    cfg, _ = _check(make_plugin_manager, _cfg(tmp_path, adapter="lora", load_in_8bit=True))
    assert bnb_config(cfg).load_in_8bit
