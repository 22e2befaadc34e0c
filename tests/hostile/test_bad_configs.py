"""Configs that `host validate` must refuse (exit 2, the key named) without loading any weights."""

import pytest
import yaml

from host.testing import base_config


def _cfg(tmp_path, tiny_model, text_file, **overrides):
    cfg = base_config(tiny_model("qwen3_moe"), text_file, tmp_path / "out", **overrides)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.mark.parametrize(
    "overrides, expect",
    [
        ({"learning_rate": -1e-4}, "learning_rate"),
        ({"val_set_size": 1.5}, "val_set_size"),
        ({"val_set_size": 1}, "val_set_size"),
        ({"val_set_size": -0.1}, "val_set_size"),
        ({"datasets": []}, "datasets: the list is empty"),
        ({"base_model": "/nonexistent/tiny-model"}, "base_model: /nonexistent/tiny-model does not exist"),
        ({"base_model": "./models/tiny"}, "base_model: ./models/tiny does not exist"),
        ({"tokenizer": "~/no/such/tokenizer"}, "tokenizer: ~/no/such/tokenizer does not exist"),
        ({"resume_from_checkpoint": "/nonexistent/checkpoint-5"}, "resume_from_checkpoint: /nonexistent/checkpoint-5"),
        ({"max_steps": True}, "max_steps"),
        ({"max_steps": "7"}, "max_steps"),
        ({"lora_r": True}, "lora_r"),
        ({"micro_batch_size": "2"}, "micro_batch_size"),
        ({"fsdp_version": True}, "fsdp_version"),
    ],
)
def test_validate_refuses(run_host, tmp_path, tiny_model, text_file, overrides, expect):
    result = run_host("validate", _cfg(tmp_path, tiny_model, text_file, **overrides))
    assert result.exit_code == 2, result.output
    assert expect in result.output and "Traceback" not in result.output


def test_float_keys_accept_ints_and_hub_ids_pass(run_host, tmp_path, tiny_model, text_file):
    path = _cfg(tmp_path, tiny_model, text_file, learning_rate=1, lora_alpha=16, val_set_size=0, num_epochs=2)
    assert run_host("validate", path).exit_code == 0
    from host.paths import looks_local

    assert not any(looks_local(v) for v in ("gpt2", "Qwen/Qwen3-0.6B", "org/model.v2"))
    assert all(looks_local(v) for v in ("/abs/model", "./rel", "../up", "~/m", "a/b/c", "models/"))


def test_output_dir_that_is_a_file(run_host, tmp_path, tiny_model, text_file):
    target = tmp_path / "out"
    target.write_text("precious")
    for command in ("validate", "train"):
        result = run_host(command, _cfg(tmp_path, tiny_model, text_file))
        assert result.exit_code == 2 and "is an existing file" in result.output, result.output
    assert target.read_text() == "precious"


def test_plugin_int_keys_are_strict_too(run_host, local_plugin, tmp_path, tiny_model, text_file):
    local_plugin("knobs", '''
        from pydantic import BaseModel
        from host import hookimpl

        class Knobs(BaseModel):
            knob_count: int = 1
            knob_scale: float = 1.0

        @hookimpl
        def config_model():
            return Knobs
    ''')
    ok = _cfg(tmp_path, tiny_model, text_file, plugins=["knobs"], knob_count=3, knob_scale=2)
    assert run_host("validate", ok).exit_code == 0
    bad = _cfg(tmp_path, tiny_model, text_file, plugins=["knobs"], knob_count=True)
    result = run_host("validate", bad)
    assert result.exit_code == 2 and "knob_count" in result.output
