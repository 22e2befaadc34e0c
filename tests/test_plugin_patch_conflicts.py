"""Real plugins that patch the same computation are refused at validation, naming both and the keys."""

import json

import pytest

from host.config import validate
from host.errors import ConfigError


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    import torch

    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _model(tmp_path, model_type):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return str(tmp_path)


def test_gemma4_fused_norm_rope_vs_liger_rms_norm(make_plugin_manager, tmp_path):
    plugins = ["gemma4", "liger"]
    data = {"base_model": _model(tmp_path, "gemma4_text"), "plugins": plugins, "gemma4_fused_norm_rope": True,
            "liger_rms_norm": True}
    with pytest.raises(ConfigError) as err:
        validate(data, make_plugin_manager(plugins))
    msg = str(err.value)
    assert "'gemma4' (gemma4_fused_norm_rope) and 'liger' (liger_rms_norm)" in msg
    assert "Gemma4RMSNorm" in msg and "set gemma4_fused_norm_rope to false or set liger_rms_norm to false" in msg
    # the fused loss and the fused norm+rope touch different code: together they validate
    validate({**data, "liger_rms_norm": False, "liger_fused_linear_cross_entropy": True}, make_plugin_manager(plugins))


def test_scattermoe_vs_liger_moe_experts(make_plugin_manager, tmp_path):
    plugins = ["scattermoe", "liger"]
    data = {"base_model": _model(tmp_path, "qwen3_moe"), "plugins": plugins, "liger_glu_activation": True}
    with pytest.raises(ConfigError, match=r"'scattermoe' \(always\) and 'liger' \(liger_glu_activation\) both patch "
                       r"moe.experts.forward. Turn one off: remove 'scattermoe' from plugins or set liger_glu_activation"):
        validate(data, make_plugin_manager(plugins))
    validate({**data, "liger_glu_activation": False, "liger_rms_norm": True, "liger_rope": True,
              "liger_fused_linear_cross_entropy": True}, make_plugin_manager(plugins))
    # a dense family's GLU is not an MoE expert: no conflict
    validate({**data, "base_model": _model(tmp_path, "qwen3")}, make_plugin_manager(plugins))
