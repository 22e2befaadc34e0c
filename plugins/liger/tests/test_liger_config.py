"""Config keys, validation (from config.json only, no weights) and declared patch targets."""

import importlib
import inspect
import json

import pytest

from host.config import validate
from host.errors import ConfigError
from host_plugin_liger import read_model_type
from host_plugin_liger.families import FAMILIES, KEYS, liger_kwargs, supported_keys

FLCE = "liger_fused_linear_cross_entropy"


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


def _warnings(make_plugin_manager, base_model, plugins=("liger",), **keys):
    from host.config import validate_with_warnings

    pm = make_plugin_manager(list(plugins))
    return validate_with_warnings({"base_model": str(base_model), "plugins": list(plugins), **keys}, pm)


@pytest.mark.parametrize(
    "model_type, key, why",
    [
        ("gemma4", "liger_rope", "one tensor at a time"),
        ("gemma4_text", "liger_rope", "gemma4_fused_norm_rope"),
        ("gemma4", "liger_layer_norm", "patches nothing"),
        ("gpt_oss", "liger_glu_activation", "clamped SwiGLU"),
        ("qwen3_5_moe", "liger_rope", "NotImplementedError"),
        ("qwen3_5_moe_text", "liger_rope", "transformers' RoPE stays"),
        ("llama", "liger_layer_norm", "RMSNorm"),
        ("qwen3_moe", "liger_layer_norm", "RMSNorm"),
        ("mistral", "liger_cross_entropy", "changes nothing"),
        ("gemma3", "liger_cross_entropy", "changes nothing"),
    ],
)
def test_key_without_kernel_is_one_warning_and_off(make_plugin_manager, tmp_path, model_type, key, why):
    """A key with no kernel for the family validates with ONE warning naming key, family, why and the
    alternative (as axolotl warns and skips); it is neither an error nor silent, and nothing is declared
    or patched for it."""
    cfg, warnings = _warnings(make_plugin_manager, _model_dir(tmp_path, model_type), **{key: True, "liger_rms_norm": True})
    mine = [w for w in warnings if key in w]
    assert len(mine) == 1, warnings
    assert repr(model_type) in mine[0] and why in mine[0] and "does nothing" in mine[0]
    pm = make_plugin_manager(["liger"])
    (declared,) = pm.hook.patched_targets(cfg=cfg)
    assert set(declared.values()) == {"liger_rms_norm"}, declared


def test_rms_norm_gated_is_one_warning(make_plugin_manager, tmp_path):
    cfg, warnings = _warnings(make_plugin_manager, _model_dir(tmp_path, "qwen3_5_moe"), liger_rms_norm=True,
                              liger_rms_norm_gated=True)
    (w,) = [w for w in warnings if "liger_rms_norm_gated" in w]
    assert "no fused gated RMSNorm" in w and cfg.liger_rms_norm


def test_unknown_family_is_one_warning(make_plugin_manager, tmp_path):
    cfg, warnings = _warnings(make_plugin_manager, _model_dir(tmp_path, "olmoe"), liger_rms_norm=True, liger_rope=True)
    (w,) = [w for w in warnings if "olmoe" in w]
    assert "liger_rope, liger_rms_norm: liger-kernel has no kernels for model_type 'olmoe'" in w
    assert make_plugin_manager(["liger"]).hook.patched_targets(cfg=cfg) == [{}]


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
        f"{mod}.Qwen3MoeMLP": "liger_glu_activation",  # dense layers (mlp_only_layers), if the model has any
        f"{mod}.Qwen3MoeForCausalLM.forward": "liger_fused_linear_cross_entropy",
    }


@pytest.mark.parametrize("model_type, extra, dense", [
    ("qwen3_5_moe", {}, "Qwen3_5MoeMLP"),  # the shared expert
    ("qwen3_moe", {"mlp_only_layers": [0]}, "Qwen3MoeMLP"),  # a dense layer
    ("qwen3_moe", {}, None),  # every layer routed: nothing left for liger's SwiGLU
    ("mixtral", {}, None),
])
def test_glu_leaves_routed_experts_to_experts_implementation(make_plugin_manager, tmp_path, model_type, extra, dense):
    """With another owner of the routed experts (here transformers' experts_implementation; scattermoe in
    tests/test_plugin_patch_conflicts.py) liger_glu_activation covers dense MLPs / shared experts only."""
    d = _model_dir(tmp_path, model_type, **extra)
    cfg, warnings = _warnings(make_plugin_manager, d, liger_glu_activation=True, experts_implementation="grouped_mm")
    (declared,) = make_plugin_manager(["liger"]).hook.patched_targets(cfg=cfg)
    assert "moe.experts.forward" not in declared and not any(t.endswith("Experts") for t in declared)
    if dense:
        assert declared == {f"{FAMILIES[model_type].module}.{dense}": "liger_glu_activation"}
    else:
        (w,) = [w for w in warnings if "liger_glu_activation" in w]
        assert "experts_implementation: grouped_mm computes the routed experts" in w and declared == {}


def test_table_matches_installed_liger_kernel():
    """Every family's function exists in liger's dispatch table and takes the arguments we pass."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    all_on = dict.fromkeys(KEYS, True)
    for model_type, family in FAMILIES.items():
        fn = MODEL_TYPE_TO_APPLY_LIGER_FN[model_type]
        assert fn.__name__ == family.apply_fn, model_type
        params = inspect.signature(fn).parameters
        assert set(liger_kwargs(family, all_on)) <= set(params), model_type
        module = importlib.import_module(family.module)
        for cls in family.dense_glu:  # the classes the plugin swaps for liger's SwiGLU MLP exist
            assert isinstance(getattr(module, cls), type), (model_type, cls)
        # a key we call supported has a real parameter; layer_norm only where liger has one
        assert ("liger_layer_norm" in supported_keys(family)) == bool(family.layer_norm), model_type


def test_torch_compile_keeps_the_fused_loss_out_of_dynamo(make_plugin_manager, tmp_path):
    from liger_kernel.ops import fused_linear_cross_entropy as ops

    from host_plugin_liger import patching

    original = ops.fused_linear_cross_entropy_forward, ops.fused_linear_cross_entropy_backward
    pm = make_plugin_manager(["liger"])
    cfg = _validate(make_plugin_manager, _model_dir(tmp_path, "qwen3"), torch_compile=True,
                    liger_fused_linear_cross_entropy=True)
    pm.hook.pre_model_load(cfg=cfg)
    wrapped = ops.fused_linear_cross_entropy_forward, ops.fused_linear_cross_entropy_backward
    for new, old in zip(wrapped, original):
        assert new is not old and getattr(new, "_torchdynamo_disable", False)
        assert inspect.unwrap(new) is old
    patching.restore()
    assert (ops.fused_linear_cross_entropy_forward, ops.fused_linear_cross_entropy_backward) == original


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


@pytest.mark.parametrize("tokens, hidden, vocab, rows", [(8192, 2048, 151936, 1024), (8192, 2048, 262144, 1024),
                                                         (16384, 4096, 128256, 2048), (8192, 2880, 201088, 512)])
def test_chunk_rows_through_liger_chunk_mem_const(tokens, hidden, vocab, rows):
    """liger-kernel's chunk rule with the plugin's chunk_mem_const gives chunks of >= rows (< 2x rows)."""
    import triton

    from host_plugin_liger import chunk_mem_const

    def liger_chunk(c, tokens=tokens):  # liger_kernel.ops.fused_linear_cross_entropy's own formula
        return min(triton.next_power_of_2(triton.cdiv(tokens, triton.cdiv(vocab, c * hidden))), tokens)

    assert liger_chunk(1) < rows  # liger's default: skinny chunks at these shapes
    assert rows <= liger_chunk(chunk_mem_const(tokens, hidden, vocab, rows)) <= 2 * rows
    assert chunk_mem_const(tokens, hidden, vocab, 0) == 1
    assert liger_chunk(chunk_mem_const(512, hidden, vocab, rows), 512) == 512  # fewer tokens than rows: one chunk


def test_fused_loss_forward_gets_the_chunk_setting(make_plugin_manager, tmp_path, monkeypatch):
    from liger_kernel.ops import fused_linear_cross_entropy as ops

    from host_plugin_liger import patching

    seen = []
    monkeypatch.setattr(ops, "fused_linear_cross_entropy_forward", lambda i, w, *a, **kw: seen.append(kw))
    for rows, want in ((None, 10), (0, 1), (2048, 19)):  # 8192 x 2048 tokens x hidden, vocab 151936
        pm = make_plugin_manager(["liger"])
        cfg = _validate(make_plugin_manager, _model_dir(tmp_path, "qwen3"), liger_fused_linear_cross_entropy=True,
                        liger_fused_linear_cross_entropy_chunk_rows=rows)
        pm.hook.pre_model_load(cfg=cfg)
        import torch

        ops.fused_linear_cross_entropy_forward(torch.empty(8192, 2048, device="meta"),
                                               torch.empty(151936, 2048, device="meta"), None)
        patching.restore()
        assert seen.pop()["chunk_mem_const"] == want, rows
