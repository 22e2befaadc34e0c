"""Two plugins that declare the same patched target are a config error naming both (hook patched_targets)."""

from host.testing import base_config

_PATCHER = """
from pydantic import BaseModel
from host import hookimpl

class Keys(BaseModel):
    {key}: bool = False

@hookimpl
def config_model():
    return Keys

@hookimpl
def patched_targets(cfg):
    return {{"transformers.models.x.modeling_x.XRMSNorm": "{key}"}} if cfg.{key} else {{}}
"""


def _cfg(write_config, tmp_path, **keys):
    return write_config(base_config("m", "d", tmp_path / "o", plugins=["alpha", "beta"], **keys))


def test_overlapping_patches_name_both_plugins_and_keys(run_host, write_config, local_plugin, tmp_path):
    local_plugin("alpha", _PATCHER.format(key="alpha_norm"))
    local_plugin("beta", _PATCHER.format(key="beta_norm"))
    result = run_host("validate", _cfg(write_config, tmp_path, alpha_norm=True, beta_norm=True))
    assert result.exit_code == 2, result.output
    out = result.output
    assert "'alpha' (alpha_norm) and 'beta' (beta_norm)" in out and "set alpha_norm to false or set beta_norm to false" in out, out
    assert "transformers.models.x.modeling_x.XRMSNorm" in out and "Traceback" not in out


def test_disjoint_or_inactive_patches_validate(run_host, write_config, local_plugin, tmp_path):
    local_plugin("alpha", _PATCHER.format(key="alpha_norm"))
    local_plugin("beta", _PATCHER.format(key="beta_norm"))
    result = run_host("validate", _cfg(write_config, tmp_path, alpha_norm=True))
    assert result.exit_code == 0, result.output
