"""Every validation rule of torch_compile_options, through the host's real config loading and CLI."""

from __future__ import annotations

import types

import pytest

from host.config import load_config
from host.errors import ConfigError
from host.testing import base_config
from host_plugin_compile_opts import options as opts
from host_plugin_compile_opts.options import ALLOWLIST


def _cfg(tmp_path, **overrides) -> dict:
    data = {"path": str(tmp_path / "data.jsonl"), "type": "completion"}
    (tmp_path / "no-model-here").mkdir(exist_ok=True)  # must exist for validate; empty, so any load would fail
    cfg = base_config(tmp_path / "no-model-here", data["path"], tmp_path / "out", plugins=["compile_opts"])
    cfg["datasets"] = [data]
    cfg.update(overrides)
    return cfg


@pytest.fixture
def load(write_config, tmp_path):
    """``load(**overrides) -> (cfg, pm, warnings)`` through host.config.load_config."""

    def run(**overrides):
        return load_config(write_config(_cfg(tmp_path, **overrides)))

    return run


# --- default: no options, no effect ----------------------------------------------------------


def test_default_is_none_and_changes_nothing(load, write_config, tmp_path):
    cfg, pm, warnings = load()
    assert cfg.torch_compile_options is None
    assert warnings == []
    assert [cb for cbs in pm.hook.trainer_callbacks(cfg=cfg) for cb in (cbs or [])] == []
    plain = _cfg(tmp_path)
    plain["plugins"] = []
    without, _, _ = load_config(write_config(plain, "plain.yaml"))
    dumped = cfg.model_dump(mode="json")
    assert dumped.pop("torch_compile_options") is None
    dumped["plugins"] = []
    assert dumped == without.model_dump(mode="json")


def test_empty_mapping_is_a_no_op_even_without_compile(load):
    cfg, pm, warnings = load(torch_compile_options={})
    assert warnings == []
    assert [cb for cbs in pm.hook.trainer_callbacks(cfg=cfg) for cb in (cbs or [])] == []


# --- accepted --------------------------------------------------------------------------------


def test_every_allowlisted_key_is_accepted(load):
    values = {key: True for key in ALLOWLIST}
    values["triton.cudagraphs"] = False
    cfg, pm, warnings = load(torch_compile=True, torch_compile_options=values)
    assert cfg.torch_compile_options == values
    assert warnings == []
    (callback,) = [cb for cbs in pm.hook.trainer_callbacks(cfg=cfg) for cb in (cbs or [])]
    assert callback.options == values


def test_nested_mapping_is_read_as_dotted_keys(load):
    cfg, _, _ = load(torch_compile=True, torch_compile_options={"triton": {"cudagraphs": False}})
    assert cfg.torch_compile_options == {"triton.cudagraphs": False}


@pytest.mark.parametrize("compile_value", [True, "auto"])
def test_compile_true_or_auto_passes(load, compile_value):
    cfg, _, _ = load(torch_compile=compile_value, torch_compile_options={"max_autotune_gemm": True})
    assert cfg.torch_compile_options == {"max_autotune_gemm": True}


# --- errors ----------------------------------------------------------------------------------


def test_unknown_key_lists_the_allowed_keys(load):
    with pytest.raises(ConfigError) as err:
        load(torch_compile=True, torch_compile_options={"max_autotune_gem": True, "freezing": True})
    msg = str(err.value)
    assert "'max_autotune_gem' is not an allowed Inductor flag" in msg
    assert "Did you mean 'max_autotune_gemm'?" in msg
    assert "'freezing' is not an allowed Inductor flag" in msg
    for key in ALLOWLIST:
        assert key in msg


@pytest.mark.parametrize("value", [1, 0, "true", "yes", 1.0])
def test_wrong_value_type_is_an_error(load, value):
    with pytest.raises(ConfigError) as err:
        load(torch_compile=True, torch_compile_options={"coordinate_descent_tuning": value})
    msg = str(err.value)
    assert "torch_compile_options.coordinate_descent_tuning: expected true or false" in msg
    assert repr(value) in msg
    assert "`coordinate_descent_tuning: true`" in msg


def test_non_scalar_value_is_an_error(load):
    with pytest.raises(ConfigError, match=r"torch_compile_options\.shape_padding must be a single value"):
        load(torch_compile=True, torch_compile_options={"shape_padding": [True]})


def test_null_value_means_unset(load):
    """An explicit null means unset (as in axolotl), here as everywhere in the config."""
    cfg, _, _ = load(torch_compile=True, torch_compile_options={"shape_padding": None, "epilogue_fusion": False})
    assert cfg.torch_compile_options == {"epilogue_fusion": False}


def test_options_without_compile_are_an_error(load):
    with pytest.raises(ConfigError) as err:
        load(torch_compile=False, torch_compile_options={"epilogue_fusion": False})
    assert "torch_compile is false" in str(err.value)
    assert "Set torch_compile: true" in str(err.value)


def test_all_problems_are_reported_at_once(load):
    with pytest.raises(ConfigError) as err:
        load(torch_compile_options={"nope": True, "shape_padding": "no"})
    msg = str(err.value)
    assert "'nope'" in msg and "torch_compile_options.shape_padding: expected" in msg and "torch_compile is false" in msg


def test_key_missing_from_installed_torch_names_the_version(load, monkeypatch):
    """An older/newer torch without a flag: stand in a config object lacking max_autotune_gemm."""
    import torch

    real = opts.inductor_config()
    fields = {k: opts.read_flag(real, k) for k in ALLOWLIST if "." not in k and k != "max_autotune_gemm"}
    stand_in = types.SimpleNamespace(**fields, triton=types.SimpleNamespace(cudagraphs=False))
    monkeypatch.setattr(opts, "inductor_config", lambda: stand_in)
    with pytest.raises(ConfigError) as err:
        load(torch_compile=True, torch_compile_options={"max_autotune_gemm": True, "shape_padding": True})
    msg = str(err.value)
    assert f"the installed torch {torch.__version__} has no torch._inductor.config.max_autotune_gemm" in msg
    assert "shape_padding" not in msg


# --- warnings --------------------------------------------------------------------------------


def _chat(tmp_path):
    return [{"path": str(tmp_path / "chat.jsonl"), "type": "chat_template"}]


def test_cudagraphs_with_variable_length_batches_warns(load, tmp_path):
    _, _, warnings = load(
        torch_compile=True, torch_compile_options={"triton.cudagraphs": True}, datasets=_chat(tmp_path)
    )
    (warning,) = warnings
    assert "CUDA graphs replay fixed tensor shapes" in warning
    assert "datasets[0] (type 'chat_template')" in warning
    assert "pad_to_sequence_len: true" in warning


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # completion: fixed-length sequence_len blocks
        {"pad_to_sequence_len": True, "datasets": "chat"},  # padded to sequence_len: static
        {"torch_compile_options": {"triton.cudagraphs": False}, "datasets": "chat"},
    ],
)
def test_static_shapes_or_cudagraphs_off_do_not_warn(load, tmp_path, overrides):
    overrides = {"torch_compile_options": {"triton.cudagraphs": True}, **overrides}
    if overrides.get("datasets") == "chat":
        overrides["datasets"] = _chat(tmp_path)
    _, _, warnings = load(torch_compile=True, **overrides)
    assert warnings == []


@pytest.mark.parametrize("pad", [False, True])
def test_cudagraphs_with_sample_packing_warns(load, pad):
    cfg, _, warnings = load(torch_compile=True, torch_compile_options={"triton.cudagraphs": True}, pad_to_sequence_len=pad)
    assert opts.check(cfg) == [] and warnings == []
    _, _, (warning,) = load(torch_compile=True, torch_compile_options={"triton.cudagraphs": True},
                            pad_to_sequence_len=pad, sample_packing=True)
    assert "sample_packing is on" in warning and "static" in warning


def test_mode_that_overrides_an_option_warns(load):
    _, _, warnings = load(
        torch_compile=True,
        torch_compile_mode="reduce-overhead",
        torch_compile_options={"triton.cudagraphs": False, "max_autotune_gemm": True},
    )
    (warning,) = warnings
    assert "torch_compile_mode 'reduce-overhead' sets triton.cudagraphs=True" in warning
    _, _, warnings = load(
        torch_compile=True, torch_compile_mode="max-autotune-no-cudagraphs", torch_compile_options={"triton.cudagraphs": False}
    )
    assert warnings == []


# --- the CLI: validate / preprocess / train check before loading anything --------------------


def test_host_validate_shows_the_options(run_host, write_config, tmp_path):
    path = write_config(_cfg(tmp_path, torch_compile=True, torch_compile_options={"triton": {"cudagraphs": True}}))
    result = run_host("validate", path)
    assert result.exit_code == 0, result.output
    assert "torch_compile_options:\n  triton.cudagraphs: true\n" in result.stdout


@pytest.mark.parametrize("command", ["validate", "preprocess", "train"])
def test_cli_rejects_bad_options_before_loading(run_host, write_config, tmp_path, command):
    # base_model does not exist: reaching any model/tokenizer load would fail with a different error
    cfg = _cfg(tmp_path, torch_compile=True, torch_compile_options={"max_autotune": True},
               dataset_prepared_path=str(tmp_path / "prep"))
    result = run_host(command, write_config(cfg))
    assert result.exit_code == 2
    assert result.output.startswith("error: ")
    assert "torch_compile_options: 'max_autotune' is not an allowed Inductor flag" in result.output
    assert "no-model-here" not in result.output


# --- apply / restore on the real torch._inductor.config --------------------------------------


def test_apply_and_restore_real_config():
    config = opts.inductor_config()
    before = {k: opts.read_flag(config, k) for k in ALLOWLIST}
    flipped = {"triton.cudagraphs": not before["triton.cudagraphs"], "epilogue_fusion": not before["epilogue_fusion"]}
    previous = opts.apply(flipped)
    try:
        assert config.triton.cudagraphs is flipped["triton.cudagraphs"]
        assert config.epilogue_fusion is flipped["epilogue_fusion"]
        assert previous == {k: before[k] for k in flipped}
    finally:
        opts.restore(previous)
    assert {k: opts.read_flag(config, k) for k in ALLOWLIST} == before


def test_apply_rolls_back_when_a_key_fails():
    config = opts.inductor_config()
    before = config.shape_padding
    with pytest.raises(ConfigError):
        opts.apply({"shape_padding": not before, "not_a_flag": True})
    assert config.shape_padding is before


def test_callback_does_nothing_when_compile_resolved_off(caplog):
    from host_plugin_compile_opts.callback import CompileOptionsCallback

    config = opts.inductor_config()
    before = config.coordinate_descent_tuning
    cb = CompileOptionsCallback({"coordinate_descent_tuning": not before})
    args = types.SimpleNamespace(torch_compile=False)
    cb.on_train_begin(args, None, None)
    assert config.coordinate_descent_tuning is before
    assert "torch_compile_options not applied" in caplog.text
    cb.on_train_end(args, None, None)
    assert config.coordinate_descent_tuning is before
