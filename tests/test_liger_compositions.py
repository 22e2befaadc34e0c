"""liger with the plugins issue 17 says it composes with (mxfp4 on scattermoe, compile_opts, gemma4): the
combinations validate, declare no shared target, and apply liger's patches (real plugins, every one installed)."""

import pytest

from host.config import validate, validate_with_warnings

LIGER = {"liger_rms_norm": True, "liger_rope": True, "liger_fused_linear_cross_entropy": True}


pytestmark = pytest.mark.usefixtures("triton_off_gpu")


def _declared(pm, cfg) -> dict[str, list]:
    out: dict[str, list] = {}
    for impl in pm.hook.patched_targets.get_hookimpls():
        for target in impl.function(cfg=cfg) or {}:
            out.setdefault(target, []).append(impl.plugin_name)
    return out


def test_liger_with_mxfp4_experts_on_scattermoe(make_plugin_manager, config_only_model):
    """4-bit experts (mxfp4 through scattermoe) keep the routed experts; liger's norms, RoPE and fused loss apply."""
    plugins = ["scattermoe", "mxfp4", "liger"]
    data = {"base_model": config_only_model("qwen3_moe"), "plugins": plugins, "adapter": "lora",
            "lora_target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
            "quantize_moe_experts": "mxfp4", "liger_glu_activation": True, **LIGER}
    cfg, warnings = validate_with_warnings(data, make_plugin_manager(plugins))
    declared = _declared(make_plugin_manager(plugins), cfg)
    assert all(len(owners) == 1 for owners in declared.values()), declared
    assert "moe.experts.forward" in declared and "liger" not in declared["moe.experts.forward"]
    mod = "transformers.models.qwen3_moe.modeling_qwen3_moe"
    assert declared[f"{mod}.Qwen3MoeRMSNorm"] == ["liger"] and declared[f"{mod}.apply_rotary_pos_emb"] == ["liger"]
    assert any("liger_glu_activation" in w and "scattermoe" in w for w in warnings)  # routed experts are not liger's


def test_liger_with_compile_opts_under_torch_compile(make_plugin_manager, config_only_model):
    """compile_opts' Inductor flags and liger validate together; the fused loss is kept out of Dynamo."""
    from liger_kernel.ops import fused_linear_cross_entropy as ops

    from host_plugin_liger import patching

    plugins = ["compile_opts", "liger"]
    data = {"base_model": config_only_model("qwen3"), "plugins": plugins, "torch_compile": True,
            "torch_compile_options": {"epilogue_fusion": True}, **LIGER}
    pm = make_plugin_manager(plugins)
    cfg = validate(data, pm)
    assert cfg.torch_compile_options == {"epilogue_fusion": True}
    pm.hook.pre_model_load(cfg=cfg)
    try:
        assert getattr(ops.fused_linear_cross_entropy_forward, "_torchdynamo_disable", False)
        assert getattr(ops.fused_linear_cross_entropy_backward, "_torchdynamo_disable", False)
    finally:
        patching.restore()


def test_liger_with_gemma4(make_plugin_manager, config_only_model):
    """gemma4's fused q/k/v norm + RoPE with liger's fused loss and GeGLU: no shared target, both apply."""
    plugins = ["gemma4", "liger"]
    data = {"base_model": config_only_model("gemma4_text"), "plugins": plugins, "gemma4_fused_norm_rope": True,
            "liger_fused_linear_cross_entropy": True, "liger_glu_activation": True}
    cfg = validate(data, make_plugin_manager(plugins))
    declared = _declared(make_plugin_manager(plugins), cfg)
    assert all(len(owners) == 1 for owners in declared.values()), declared
    mod = "transformers.models.gemma4.modeling_gemma4"
    assert declared[f"{mod}.Gemma4RMSNorm"] == ["gemma4"]
    assert declared[f"{mod}.Gemma4TextMLP"] == ["liger"]
    assert any(t.endswith("ForCausalLM.forward") and owners == ["liger"] for t, owners in declared.items())
