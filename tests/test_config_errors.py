"""Every bad config input exits 2 with a message naming the file/key and the fix."""

import pytest

from host.testing import base_config


def _fails(run_host, *args):
    result = run_host(*args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.output


def test_missing_config_file(run_host, tmp_path):
    out = _fails(run_host, "validate", tmp_path / "nope.yaml")
    assert "nope.yaml: config file not found" in out


def test_unreadable_config_file(run_host, tmp_path):
    d = tmp_path / "adir.yaml"
    d.mkdir()
    out = _fails(run_host, "validate", d)
    assert "adir.yaml: cannot read config file" in out


def test_invalid_yaml_names_line(run_host, tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("base_model: x\ndatasets: [\n  - path: a\n")
    out = _fails(run_host, "validate", p)
    assert "bad.yaml: line" in out and "invalid YAML" in out


def test_empty_and_non_mapping(run_host, tmp_path):
    (tmp_path / "e.yaml").write_text("")
    assert "config file is empty" in _fails(run_host, "validate", tmp_path / "e.yaml")
    (tmp_path / "l.yaml").write_text("- a\n- b\n")
    assert "top level must be a mapping" in _fails(run_host, "validate", tmp_path / "l.yaml")


def test_unknown_key_suggests_closest(run_host, write_config, tmp_path):
    cfg = base_config("m", "d.jsonl", tmp_path / "o", learning_rat=1e-3)
    out = _fails(run_host, "validate", write_config(cfg))
    assert "unknown key 'learning_rat'" in out and "Did you mean 'learning_rate'" in out


def test_unknown_dataset_entry_key(run_host, write_config, tmp_path):
    cfg = base_config("m", "d.jsonl", tmp_path / "o")
    cfg["datasets"][0]["feild"] = "text"
    out = _fails(run_host, "validate", write_config(cfg))
    assert "unknown key 'datasets[0].feild'" in out and "Did you mean 'field'" in out


def test_unknown_dataset_type(run_host, write_config, tmp_path):
    cfg = base_config("m", "d.jsonl", tmp_path / "o")
    cfg["datasets"][0]["type"] = "completions"
    out = _fails(run_host, "validate", write_config(cfg))
    assert "datasets[0].type: unknown dataset type 'completions'" in out and "'completion'" in out


def test_wrong_type_names_key_path(run_host, write_config, tmp_path):
    out = _fails(run_host, "validate", write_config(base_config("m", "d.jsonl", tmp_path / "o", micro_batch_size="two")))
    assert "key 'micro_batch_size'" in out and "'two'" in out
    out = _fails(run_host, "validate", write_config(base_config("m", "d.jsonl", tmp_path / "o", lora_r=0)))
    assert "key 'lora_r'" in out


def test_missing_required_key(run_host, write_config, tmp_path):
    cfg = base_config("m", "d.jsonl", tmp_path / "o")
    del cfg["base_model"]
    assert "missing required key 'base_model'" in _fails(run_host, "validate", write_config(cfg))


def test_validate_prints_resolved_config(run_host, write_config, tmp_path):
    result = run_host("validate", write_config(base_config("m", "d.jsonl", tmp_path / "o")))
    assert result.exit_code == 0, result.output
    assert "base_model: m" in result.output and "excess_length_strategy: drop" in result.output


# --- plugins -------------------------------------------------------------------------------


def test_unknown_plugin_lists_installed(run_host, write_config, local_plugin, tmp_path):
    local_plugin("alpha", "from host import hookimpl")
    out = _fails(run_host, "validate", write_config(base_config("m", "d", tmp_path / "o", plugins=["alpah"])))
    assert "unknown plugin 'alpah'" in out and "Did you mean 'alpha'" in out and "Installed plugins:" in out


def test_broken_plugin_names_cause(run_host, write_config, local_plugin, tmp_path):
    local_plugin("broken", "import no_such_module_xyz")
    out = _fails(run_host, "validate", write_config(base_config("m", "d", tmp_path / "o", plugins=["broken"])))
    assert "plugin 'broken'" in out and "failed to import" in out and "no_such_module_xyz" in out


def test_misspelled_hook_is_an_error(run_host, write_config, local_plugin, tmp_path):
    local_plugin("typo", "from host import hookimpl\n@hookimpl\ndef pre_model_lod(cfg):\n    pass\n")
    out = _fails(run_host, "validate", write_config(base_config("m", "d", tmp_path / "o", plugins=["typo"])))
    assert "pre_model_lod" in out and "host.hookspecs" in out


def test_missing_required_plugin(run_host, write_config, local_plugin, tmp_path):
    local_plugin("base", "")
    local_plugin("needy", "REQUIRES = ['base']")
    out = _fails(run_host, "validate", write_config(base_config("m", "d", tmp_path / "o", plugins=["needy"])))
    assert "plugin 'needy' requires plugin 'base'" in out
    ok = run_host("validate", write_config(base_config("m", "d", tmp_path / "o", plugins=["base", "needy"])))
    assert ok.exit_code == 0, ok.output


_KEY_PLUGIN = """
from host import hookimpl
from host.config import StrictModel

class Keys(StrictModel):
    shared_key: int = 1

@hookimpl
def config_model():
    return Keys
"""


def test_config_key_collision_names_both(run_host, write_config, local_plugin, tmp_path):
    local_plugin("one", _KEY_PLUGIN)
    local_plugin("two", _KEY_PLUGIN)
    out = _fails(run_host, "validate", write_config(base_config("m", "d", tmp_path / "o", plugins=["one", "two"])))
    assert "'shared_key' is claimed by both 'one' and 'two'" in out


def test_plugin_key_validated_and_shown(run_host, write_config, local_plugin, tmp_path):
    local_plugin("one", _KEY_PLUGIN)
    result = run_host("validate", write_config(base_config("m", "d", tmp_path / "o", plugins=["one"], shared_key=5)))
    assert result.exit_code == 0 and "shared_key: 5" in result.output
    out = _fails(run_host, "validate", write_config(base_config("m", "d", tmp_path / "o", shared_key=5)))
    assert "unknown key 'shared_key'" in out  # without the plugin, its key is unknown


def test_dataset_type_claimed_twice(run_host, write_config, local_plugin, tmp_path):
    src = "from host import hookimpl\nfrom host.builtin import CompletionDataset\n@hookimpl\ndef dataset_types():\n    return {'completion': CompletionDataset}\n"
    local_plugin("dup", src)
    out = _fails(run_host, "validate", write_config(base_config("m", "d", tmp_path / "o", plugins=["dup"])))
    assert "dataset type 'completion' is claimed by both" in out and "'dup'" in out


def test_unnamed_plugins_are_never_imported(make_plugin_manager, local_plugin):
    local_plugin("bomb", "raise RuntimeError('imported!')")
    pm = make_plugin_manager([])
    assert [n for n, _ in pm.list_name_plugin()] == ["host"]
    with pytest.raises(Exception, match="imported!"):
        make_plugin_manager(["bomb"])


def test_hooks_run_in_plugins_order(make_plugin_manager, local_plugin):
    src = "from host import hookimpl\n@hookimpl\ndef trainer_callbacks(cfg):\n    return ['{n}']\n"
    local_plugin("first", src.format(n="first"))
    local_plugin("second", src.format(n="second"))
    assert make_plugin_manager(["first", "second"]).hook.trainer_callbacks(cfg=None) == [["first"], ["second"]]
    assert make_plugin_manager(["second", "first"]).hook.trainer_callbacks(cfg=None) == [["second"], ["first"]]


def test_plugins_list_shows_hooks_without_importing(run_host, local_plugin):
    local_plugin("lister", "raise RuntimeError('must not import')\nfrom host import hookimpl\n@hookimpl\ndef pre_model_load(cfg):\n    pass\n")
    result = run_host("plugins", "list")
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("lister"))
    assert "host-plugin-lister" in line and "0.1.0" in line and "pre_model_load" in line
