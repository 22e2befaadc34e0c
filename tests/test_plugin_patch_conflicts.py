"""Real plugins that patch the same computation are refused at validation, naming both and the keys."""

import pytest

from host.config import validate
from host.errors import ConfigError


pytestmark = pytest.mark.usefixtures("triton_off_gpu")


def test_gemma4_fused_norm_rope_vs_liger_rms_norm(make_plugin_manager, config_only_model):
    plugins = ["gemma4", "liger"]
    data = {"base_model": config_only_model("gemma4_text"), "plugins": plugins, "gemma4_fused_norm_rope": True,
            "liger_rms_norm": True}
    with pytest.raises(ConfigError) as err:
        validate(data, make_plugin_manager(plugins))
    msg = str(err.value)
    assert "'gemma4' (gemma4_fused_norm_rope) and 'liger' (liger_rms_norm)" in msg
    assert "Gemma4RMSNorm" in msg and "set gemma4_fused_norm_rope to false or set liger_rms_norm to false" in msg
    # the fused loss and the fused norm+rope touch different code: together they validate
    validate({**data, "liger_rms_norm": False, "liger_fused_linear_cross_entropy": True}, make_plugin_manager(plugins))


def test_scattermoe_owns_routed_experts_liger_glu_the_dense_and_shared_mlps(make_plugin_manager, config_only_model):
    """The order scattermoe and liger agree on: scattermoe computes the routed experts; liger_glu_activation
    then replaces only the dense MLPs / shared experts, so the host's overlap check passes."""
    from host.config import validate_with_warnings

    plugins = ["scattermoe", "liger"]
    keys = {"liger_glu_activation": True, "liger_rms_norm": True, "liger_fused_linear_cross_entropy": True}
    cfg = validate({"base_model": config_only_model("qwen3_5_moe"), "plugins": plugins, **keys},
                   make_plugin_manager(plugins))
    pm = make_plugin_manager(plugins)
    declared = {t: k for d in pm.hook.patched_targets(cfg=cfg) for t, k in (d or {}).items()}
    mod = "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe"
    assert declared["moe.experts.forward"] == ""  # scattermoe's
    assert declared[f"{mod}.Qwen3_5MoeMLP"] == "liger_glu_activation"  # the shared expert
    assert f"{mod}.Qwen3_5MoeExperts" not in declared
    # every layer of this Qwen3-MoE is routed: liger's GLU has nothing left, one warning says so
    _, warnings = validate_with_warnings({"base_model": config_only_model("qwen3_moe", "moe"), "plugins": plugins,
                                          **keys}, make_plugin_manager(plugins))
    (w,) = [w for w in warnings if "liger_glu_activation" in w]
    assert "plugin 'scattermoe' computes the routed experts" in w
    # a dense family's GLU is not an MoE expert: no conflict
    validate({"base_model": config_only_model("qwen3", "dense"), "plugins": plugins, **keys}, make_plugin_manager(plugins))