"""Config keys, validation (from config.json only, no weights) and declared patch targets."""

import inspect
import json

import pytest

from host.config import validate
from host.errors import ConfigError
from host_plugin_liger import read_model_type
from host_plugin_liger.families import FAMILIES, KEYS, liger_kwargs, supported_keys


def _model_dir(tmp_path, model_type, **extra):
    d = tmp_path / model_type
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": model_type, **extra}))
    return d


def _validate(make_plugin_manager, base_model, plugins=("liger",), **keys):
    pm = make_plugin_manager(list(plugins))
    return validate({"base_model": str(base_model), "plugins": list(plugins), **keys}, pm)


def test_keys_default_off_and_validate(make_plugin_manager, tmp_path):
    cfg = _validate(make_plugin_manager, _model_dir(tmp_path, "qwen3_moe"), liger_rms_norm=True,
                    liger_fused_linear_cross_entropy=True)
    assert cfg.liger_rms_norm and cfg.liger_fused_linear_cross_entropy and cfg.liger_rope is None


def test_model_type_is_read_from_config_json_only(tmp_path):
    d = _model_dir(tmp_path, "gemma4", text_config={"model_type": "gemma4_text"})
    assert read_model_type(str(d)) == "gemma4"
    assert read_model_type(str(tmp_path / "nowhere")) is None


@pytest.mark.parametrize(
    "model_type, key, why",
    [
        ("gemma4", "liger_rope", "one tensor at a time"),
        ("gemma4_text", "liger_rope", "gemma4_fused_norm_rope"),
        ("gemma4", "liger_layer_norm", "patches nothing"),
        ("gpt_oss", "liger_glu_activation", "clamped SwiGLU"),
        ("qwen3_5_moe", "liger_rope", "NotImplementedError"),
        ("llama", "liger_layer_norm", "RMSNorm"),
        ("qwen3_moe", "liger_layer_norm", "RMSNorm"),
        ("mistral", "liger_cross_entropy", "silent no-op"),
        ("gemma3", "liger_cross_entropy", "silent no-op"),
    ],
)
def test_unsupported_key_names_key_family_and_alternative(make_plugin_manager, tmp_path, model_type, key, why):
    with pytest.raises(ConfigError) as err:
        _validate(make_plugin_manager, _model_dir(tmp_path, model_type), **{key: True})
    msg = str(err.value)
    assert key in msg and repr(model_type) in msg and why in msg and f"Set {key}: false" in msg


def test_unknown_family_is_an_error(make_plugin_manager, tmp_path):
    with pytest.raises(ConfigError, match=r"liger_rms_norm: liger-kernel has no patches for model_type 'olmoe'"):
        _validate(make_plugin_manager, _model_dir(tmp_path, "olmoe"), liger_rms_norm=True)


def test_cross_entropy_and_fused_are_exclusive(make_plugin_manager, tmp_path):
    with pytest.raises(ConfigError, match="set one of them"):
        _validate(make_plugin_manager, _model_dir(tmp_path, "llama"), liger_cross_entropy=True,
                  liger_fused_linear_cross_entropy=True)


def test_no_key_on_warns(make_plugin_manager, tmp_path):
    from host.config import validate_with_warnings

    pm = make_plugin_manager(["liger"])
    _, warnings = validate_with_warnings({"base_model": str(_model_dir(tmp_path, "llama")), "plugins": ["liger"]}, pm)
    assert any("patches nothing" in w for w in warnings)


def test_lm_head_lora_with_dropout_is_refused(make_plugin_manager, tmp_path):
    with pytest.raises(ConfigError, match="lora_dropout"):
        _validate(make_plugin_manager, _model_dir(tmp_path, "qwen3"), liger_fused_linear_cross_entropy=True,
                  adapter="lora", lora_dropout=0.1, lora_target_modules=["q_proj", "lm_head"])
    _validate(make_plugin_manager, _model_dir(tmp_path, "qwen3"), liger_fused_linear_cross_entropy=True,
              adapter="lora", lora_dropout=0.0, lora_target_modules=["q_proj", "lm_head"])


def test_declared_targets(make_plugin_manager, tmp_path):
    pm = make_plugin_manager(["liger"])
    cfg = _validate(make_plugin_manager, _model_dir(tmp_path, "qwen3_moe"), liger_rms_norm=True,
                    liger_glu_activation=True, liger_fused_linear_cross_entropy=True)
    (declared,) = [t for t in pm.hook.patched_targets(cfg=cfg) if t]
    mod = "transformers.models.qwen3_moe.modeling_qwen3_moe"
    assert declared == {
        f"{mod}.Qwen3MoeRMSNorm": "liger_rms_norm",
        f"{mod}.Qwen3MoeExperts": "liger_glu_activation",
        "moe.experts.forward": "liger_glu_activation",
        f"{mod}.Qwen3MoeForCausalLM.forward": "liger_fused_linear_cross_entropy",
    }


def test_table_matches_installed_liger_kernel():
    """Every family's function exists in liger's dispatch table and takes the arguments we pass."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    all_on = dict.fromkeys(KEYS, True)
    for model_type, family in FAMILIES.items():
        fn = MODEL_TYPE_TO_APPLY_LIGER_FN[model_type]
        assert fn.__name__ == family.apply_fn, model_type
        params = inspect.signature(fn).parameters
        assert set(liger_kwargs(family, all_on)) <= set(params), model_type
        # a key we call supported has a real parameter; layer_norm only where liger has one
        assert ("liger_layer_norm" in supported_keys(family)) == bool(family.layer_norm), model_type


def test_torch_compile_keeps_the_fused_loss_out_of_dynamo(make_plugin_manager, tmp_path):
    from liger_kernel.ops import fused_linear_cross_entropy as ops

    from host_plugin_liger import patching

    original = ops.fused_linear_cross_entropy_forward
    pm = make_plugin_manager(["liger"])
    cfg = _validate(make_plugin_manager, _model_dir(tmp_path, "qwen3"), torch_compile=True,
                    liger_fused_linear_cross_entropy=True)
    pm.hook.pre_model_load(cfg=cfg)
    wrapped = ops.fused_linear_cross_entropy_forward
    assert wrapped is not original and getattr(wrapped, "__wrapped__", None) is original
    patching.restore()
    assert ops.fused_linear_cross_entropy_forward is original


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_family_patches_exactly_what_it_declares(model_type):
    """liger's apply function, all supported keys on (except the loss pair): every declared target changes."""
    from host_plugin_liger import patching
    from host_plugin_liger.families import targets

    family = FAMILIES[model_type]
    supported = {k: k in supported_keys(family) for k in KEYS}
    losses = ("liger_cross_entropy", "liger_fused_linear_cross_entropy")
    for loss_key in losses:  # the two losses are exclusive: one at a time
        on = {**supported, **{k: k == loss_key and supported[k] for k in losses}}
        changed = patching.apply(family, on)
        patching.restore()
        declared = {t for t in targets(family, on) if t.startswith(("transformers.", "torch."))}
        assert declared <= changed, (declared - changed, sorted(changed))
