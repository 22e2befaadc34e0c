"""What a third-party plugin author runs into: fixtures, name clashes, import failures, order, versions."""

import subprocess
import sys

import pytest

from host.testing import base_config, offline_env, write_plugin_dist

VALUE_PLUGIN = '''
    from pydantic import BaseModel
    from host import hookimpl

    class Cfg(BaseModel):
        reused_value: int = {value}

    @hookimpl
    def config_model():
        return Cfg
'''


def _value(make_plugin_manager):
    pm = make_plugin_manager(["reused"])
    return pm.hook.config_model()[0].model_fields["reused_value"].default


@pytest.mark.parametrize("value", [1, 2])
def test_local_plugin_is_per_test(local_plugin, make_plugin_manager, value):
    """Run twice in one process: the second test must get its own module, not the first one's."""
    local_plugin("reused", VALUE_PLUGIN.format(value=value))
    assert _value(make_plugin_manager) == value


def test_local_plugin_rewritten_within_a_test(local_plugin, make_plugin_manager):
    local_plugin("reused", VALUE_PLUGIN.format(value=3))
    assert _value(make_plugin_manager) == 3
    local_plugin("reused", VALUE_PLUGIN.format(value=4))
    assert _value(make_plugin_manager) == 4


def test_two_distributions_claiming_one_name(local_plugin, run_host, write_config, tmp_path):
    site = local_plugin("gs", "X = 1")
    write_plugin_dist(site, "gs", "X = 2", distribution="fork-gs")
    listing = run_host("plugins", "list")
    assert "host-plugin-gs" in listing.output and "fork-gs" in listing.output
    assert "claimed by 2 distributions" in listing.output
    result = run_host("validate", write_config({"base_model": "gpt2", "plugins": ["gs"]}))
    assert result.exit_code == 2, result.output
    assert "host-plugin-gs" in result.output and "fork-gs" in result.output and "Uninstall" in result.output
    assert "Traceback" not in result.output and "__qualname__" not in result.output


def test_missing_dependency_says_install_not_reinstall(local_plugin, run_host, write_config):
    local_plugin("needy", "import no_such_dependency_xyz\n")
    result = run_host("validate", write_config({"base_model": "gpt2", "plugins": ["needy"]}))
    assert result.exit_code == 2
    assert "'no_such_dependency_xyz', which is not installed" in result.output and "Install" in result.output
    assert "Reinstall" not in result.output


def test_import_error_names_file_and_line(local_plugin, run_host, write_config):
    site = local_plugin("broken", "import os\n\nVALUE = 1 / 0\n")
    result = run_host("validate", write_config({"base_model": "gpt2", "plugins": ["broken"]}))
    assert result.exit_code == 2
    assert f"{site / 'host_plugin_broken.py'}:3" in result.output and "ZeroDivisionError" in result.output
    site = local_plugin("typo", "def f(:\n    pass\n")
    result = run_host("validate", write_config({"base_model": "gpt2", "plugins": ["typo"]}, "t.yaml"))
    assert result.exit_code == 2 and f"{site / 'host_plugin_typo.py'}:1" in result.output


@pytest.mark.parametrize("switch", ["--debug", "HOST_DEBUG=1"])
def test_debug_switch_shows_the_traceback(local_plugin, run_host, write_config, monkeypatch, switch):
    local_plugin("broken", "VALUE = 1 / 0\n")
    cfg = write_config({"base_model": "gpt2", "plugins": ["broken"]})
    plain = run_host("validate", cfg)
    assert "Traceback" not in plain.output
    if switch == "--debug":
        monkeypatch.setenv("HOST_DEBUG", "")  # --debug sets it for the rest of this process
        result = run_host("--debug", "validate", cfg)
    else:
        monkeypatch.setenv("HOST_DEBUG", "1")
        result = run_host("validate", cfg)
    assert result.exit_code == 2
    assert "Traceback" in result.output and "ZeroDivisionError" in result.output and "error: plugins:" in result.output


def test_requires_order_enforced(local_plugin, run_host, write_config):
    local_plugin("base", "X = 1")
    local_plugin("addon", "REQUIRES = ['base']")
    result = run_host("validate", write_config({"base_model": "gpt2", "plugins": ["addon", "base"]}))
    assert result.exit_code == 2 and "must come before it" in result.output
    assert "plugins: [base, addon]" in result.output
    assert run_host("validate", write_config({"base_model": "gpt2", "plugins": ["base", "addon"]}, "ok.yaml")).exit_code == 0


def test_typo_suggests_without_advising_to_install_it(local_plugin, run_host, write_config):
    local_plugin("gradstats", "X = 1")
    result = run_host("validate", write_config({"base_model": "gpt2", "plugins": ["gradstat"]}))
    assert result.exit_code == 2 and "Did you mean 'gradstats'?" in result.output
    assert "host-plugin-gradstat " not in result.output + " " and "pip install" not in result.output
    result = run_host("validate", write_config({"base_model": "gpt2", "plugins": ["zzzz"]}, "b.yaml"))
    assert "pip install host-plugin-zzzz" in result.output


def test_version_lists_host_and_plugins(local_plugin, run_host):
    from host import __version__

    local_plugin("versioned", "X = 1")
    result = run_host("--version")
    assert result.exit_code == 0
    assert f"host {__version__}" in result.output and "plugin versioned 0.1.0 (host-plugin-versioned)" in result.output


def test_version_imports_no_torch():
    code = (
        "import sys\nfrom host.cli import app\ntry:\n    app(['--version'])\nexcept SystemExit:\n    pass\n"
        "assert not [m for m in ('torch', 'transformers') if m in sys.modules]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=offline_env(), capture_output=True)


def test_scaffold_imports_nothing_heavy(tmp_path, tiny_model, text_file):
    """`host validate` with a scaffolded plugin enabled imports neither torch nor transformers."""
    host = [sys.executable, "-m", "host"]
    subprocess.run([*host, "plugins", "new", "light", "--path", str(tmp_path)], check=True, env=offline_env())
    plugin = tmp_path / "host-plugin-light"
    site = tmp_path / "site"
    write_plugin_dist(site, "light", "")  # metadata only; the package below replaces the module
    (site / "host_plugin_light.py").unlink()
    (site / "host_plugin_light").symlink_to(plugin / "host_plugin_light")
    import yaml

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(base_config(tiny_model("qwen3_moe"), text_file, tmp_path / "o", plugins=["light"])))
    code = (
        "import sys\nfrom host.cli import app\ntry:\n    app(['validate', sys.argv[1]])\nexcept SystemExit as e:\n"
        "    assert not e.code, e.code\nheavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(cfg)], env=offline_env(PYTHONPATH=str(site)),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


GRADSTATS = '''
    import json
    from pathlib import Path

    import torch
    from transformers import TrainerCallback

    from host import hookimpl


    class GradStats(TrainerCallback):
        """Measures the gradients the optimizer will use, and keeps what on_log reports."""

        def __init__(self):
            self.applied, self.logged = {}, []

        def on_train_begin(self, args, state, control, **kwargs):
            args.max_grad_norm = 0.05  # small enough that every step of this tiny run is clipped

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            self.applied[state.global_step + 1] = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "grad_norm" in logs:
                self.logged.append({"step": state.global_step, "applied": self.applied[state.global_step],
                                    "before": logs["grad_norm"], "after": logs["grad_norm_clipped"]})

        def on_train_end(self, args, state, control, **kwargs):
            Path(args.output_dir, "gradstats.json").write_text(json.dumps(self.logged))


    @hookimpl
    def trainer_callbacks(cfg):
        return [GradStats()]
'''


def test_callbacks_see_grad_norm_before_and_after_clipping(local_plugin, run_host, write_config, tiny_model,
                                                          text_file, tmp_path):
    import json

    local_plugin("gradstats", GRADSTATS)
    out = tmp_path / "out"
    cfg = base_config(tiny_model("qwen3_moe"), text_file, out, plugins=["gradstats"], max_steps=4, learning_rate=0.05)
    result = run_host("train", write_config(cfg))
    assert result.exit_code == 0, result.output
    records = json.loads((out / "gradstats.json").read_text())
    assert len(records) == 4
    for r in records:
        assert abs(r["after"] - min(r["before"], 0.05)) < 1e-6, r
        assert abs(r["applied"] - r["after"]) < 1e-4, r  # what the optimizer got is what was reported
    assert any(r["before"] > 0.05 for r in records), "no step was clipped; the test shows nothing"


def test_plugin_type_clashing_with_a_builtin_type_says_rename(local_plugin, run_host, write_config):
    local_plugin("mine", '''
        from host import hookimpl
        from host.config import DatasetConfig

        class Mine(DatasetConfig):
            pass

        @hookimpl
        def dataset_types():
            return {"completion": Mine}
    ''')
    result = run_host("validate", write_config({"base_model": "gpt2", "plugins": ["mine"]}))
    assert result.exit_code == 2
    assert "built into the host, so plugin 'mine' must give its type another name" in result.output
