"""The model-loading hooks a quantisation plugin needs: adapter kinds, from_pretrained kwargs,
and a step between loading the base model and attaching the adapter."""

from __future__ import annotations

import pytest

from host.config import validate
from host.errors import ConfigError, PluginError
from host.testing import base_config

_KIND_PLUGIN = """
from host import hookimpl

SEEN = []

@hookimpl
def adapter_kinds():
    return ["mylora"]

@hookimpl
def model_init_kwargs(cfg, purpose):
    SEEN.append(("kwargs", purpose))
    return {"use_cache": False}

@hookimpl
def post_model_load(cfg, model):
    SEEN.append(("post_model_load", type(model).__name__, model.config.use_cache))
"""


def test_plugin_adapter_kind_needs_its_plugin(make_plugin_manager, local_plugin, tmp_path):
    local_plugin("kind", _KIND_PLUGIN)
    data = base_config("m", "d", tmp_path / "o", adapter="mylora")
    with pytest.raises(ConfigError, match="unknown adapter kind 'mylora'.*enable the plugin"):
        validate(data, make_plugin_manager([]))
    cfg = validate({**data, "plugins": ["kind"]}, make_plugin_manager(["kind"]))
    assert cfg.adapter == "mylora"


def test_adapter_kind_claimed_twice(make_plugin_manager, local_plugin, tmp_path):
    local_plugin("kind", _KIND_PLUGIN)
    local_plugin("kind2", "from host import hookimpl\n@hookimpl\ndef adapter_kinds():\n    return ['mylora']\n")
    data = base_config("m", "d", tmp_path / "o", adapter="mylora", plugins=["kind", "kind2"])
    with pytest.raises(PluginError, match="adapter kind 'mylora' is claimed by both 'kind' and 'kind2'"):
        validate(data, make_plugin_manager(["kind", "kind2"]))


def test_model_init_kwargs_reach_from_pretrained_and_post_model_load_precedes_adapter(
    make_plugin_manager, local_plugin, tiny_model, text_file, tmp_path
):
    import sys

    from host import model as model_mod

    local_plugin("kind", _KIND_PLUGIN)
    data = base_config(tiny_model("qwen3"), text_file, tmp_path / "o", adapter="mylora", plugins=["kind"])
    pm = make_plugin_manager(["kind"])
    model, _, _ = model_mod.build(validate(data, pm), pm)
    assert model.config.use_cache is False  # the plugin's from_pretrained kwarg
    assert type(model).__name__ == "PeftModelForCausalLM"  # a plugin kind gets the host's peft LoRA
    assert sys.modules["host_plugin_kind"].SEEN == [("kwargs", "train"), ("post_model_load", "Qwen3ForCausalLM", False)]


def test_model_init_kwargs_conflicts_are_errors(make_plugin_manager, local_plugin, tiny_model, text_file, tmp_path):
    from host import model as model_mod

    local_plugin("kind", _KIND_PLUGIN)
    local_plugin("other", "from host import hookimpl\n@hookimpl\ndef model_init_kwargs(cfg):\n    return {'use_cache': True}\n")
    local_plugin("greedy", "from host import hookimpl\n@hookimpl\ndef model_init_kwargs():\n    return {'dtype': 'float16'}\n")
    data = base_config(tiny_model("qwen3"), text_file, tmp_path / "o", plugins=["kind", "other"])
    pm = make_plugin_manager(["kind", "other"])
    with pytest.raises(PluginError, match="'use_cache' is set by both 'kind' and 'other'"):
        model_mod.build(validate(data, pm), pm)
    pm = make_plugin_manager(["greedy"])
    with pytest.raises(PluginError, match="'dtype' is the host's"):
        model_mod.build(validate({**data, "plugins": ["greedy"]}, pm), pm)
