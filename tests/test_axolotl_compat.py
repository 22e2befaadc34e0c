"""axolotl configs: null means unset, every problem in one run, and the axolotl key table."""

from host.testing import base_config


def _fails(run_host, *args):
    result = run_host(*args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.output


def _passes(run_host, *args):
    result = run_host(*args)
    assert result.exit_code == 0, result.output
    return result.output


def test_explicit_null_means_unset(run_host, write_config, tmp_path):
    cfg = base_config("m", "d.jsonl", tmp_path / "o", lora_r=None, warmup_steps=None, bf16=None, seed=None,
                      lora_target_modules=None, lora_target_parameters=["experts.gate_up_proj"])
    cfg["datasets"][0]["split"] = None
    cfg["datasets"][0]["data_files"] = None
    out = _passes(run_host, "validate", write_config(cfg))
    assert "lora_r: 8\n" in out and "seed: 42\n" in out and "split: train" in out


def test_every_problem_in_one_run_grouped(run_host, write_config, tmp_path):
    cfg = base_config("m", "d.jsonl", tmp_path / "o", plugins=["no_such_plugin"], learning_rat=1e-3,
                      micro_batch_size="two", warmup_ratio=0.1, warmup_steps=3, rl="dpo")
    cfg["datasets"].append({"path": "x.jsonl", "type": "completions"})
    cfg["datasets"][0]["feild"] = "text"
    out = _fails(run_host, "validate", write_config(cfg))
    assert "7 problems" in out
    sections = [line.strip() for line in out.splitlines() if line.strip() in ("plugins:", "keys:", "datasets:", "rules:")]
    assert sections == ["plugins:", "keys:", "datasets:", "rules:"]
    for needle in ("unknown plugin 'no_such_plugin'", "unknown key 'learning_rat'", "key 'micro_batch_size'",
                   "axolotl key `rl` is not supported by host", "unknown key 'datasets[0].feild'",
                   "unknown dataset type 'completions'", "warmup_ratio/warmup_steps"):
        assert needle in out, needle
    # train reports the same set before loading anything
    assert "7 problems" in _fails(run_host, "train", write_config(cfg))


def test_suggestions_only_when_close(run_host, write_config, tmp_path):
    cfg = base_config("m", "d.jsonl", tmp_path / "o", lerning_rate=1e-3, seeed=1, tokenizer_tpye="x")
    out = _fails(run_host, "validate", write_config(cfg))
    assert "Did you mean 'learning_rate'" in out and "Did you mean 'seed'" in out
    # axolotl's own keys are never "corrected" into a different host key
    cfg = base_config("m", "d.jsonl", tmp_path / "o", pretraining_dataset=[{"path": "p"}], dpo_beta=0.1)
    out = _fails(run_host, "validate", write_config(cfg))
    assert "Did you mean" not in out
    assert "axolotl key `dpo_beta` is not supported by host" in out
    assert "axolotl key `pretraining_dataset` needs host plugin `mmcpt`" in out


def test_noop_axolotl_keys_are_one_warning(run_host, write_config, tmp_path):
    cfg = base_config("m", "d.jsonl", tmp_path / "o", strict=False, gptq_groupsize=None, push_dataset_to_hub=None,
                      liger_rms_norm=False, hub_model_id="", lora_mlp_kernel=True)
    result = run_host("validate", write_config(cfg))
    assert result.exit_code == 0, result.output
    noop = [line for line in result.output.splitlines() if "do nothing at these values" in line]
    assert len(noop) == 1
    for key in ("strict: false", "gptq_groupsize: (empty)", "push_dataset_to_hub: (empty)", "liger_rms_norm: false"):
        assert key in noop[0]
    assert "lora_mlp_kernel: ignored (a speed-only kernel switch" in result.output


def test_axolotl_key_needing_a_plugin_names_it(run_host, write_config, tmp_path):
    cfg = base_config("m", "d.jsonl", tmp_path / "o", liger_rms_norm=True)
    out = _fails(run_host, "validate", write_config(cfg))
    assert "axolotl key `liger_rms_norm` needs host plugin `liger`: add liger to `plugins:`" in out


def test_dataset_entry_axolotl_keys(run_host, write_config, tmp_path):
    cfg = base_config("m", "d.jsonl", tmp_path / "o")
    cfg["datasets"][0].update(ds_type="json", shards=4, field_thinking=None)
    out = _fails(run_host, "validate", write_config(cfg))
    assert "problems" not in out  # one problem reads as a plain message
    assert "axolotl key `datasets[0].shards` is not supported by host: dataset sharding" in out
    assert "datasets[0].ds_type: ignored" in out and "datasets[0].field_thinking: (empty)" in out


def test_plugin_rules_all_reported(run_host, write_config, local_plugin, tmp_path):
    for name in ("rule_a", "rule_b"):
        local_plugin(name, f"""
            from host import hookimpl
            from host.errors import ConfigError

            @hookimpl
            def validate_config(cfg):
                raise ConfigError("{name}: broken combination; fix it")
        """)
    out = _fails(run_host, "validate", write_config(base_config("m", "d.jsonl", tmp_path / "o", plugins=["rule_a", "rule_b"])))
    assert "rule_a: broken combination" in out and "rule_b: broken combination" in out


def test_axolotl_plugin_class_path_resolves_to_host_plugin(run_host, write_config, tmp_path):
    cfg = base_config("m", "d.jsonl", tmp_path / "o", plugins=["axolotl.integrations.kernels.KernelsPlugin"],
                      use_scattermoe=True, use_kernels=True, experts_implementation="scattermoe",
                      lora_target_parameters=["experts.gate_up_proj"], lora_dropout=0.0)
    result = run_host("validate", write_config(cfg))
    assert result.exit_code == 0, result.output
    assert "axolotl's axolotl.integrations.kernels.KernelsPlugin is host plugin `scattermoe`" in result.output
    assert "plugins:\n- scattermoe\n" in result.output
    # the switch without the plugin names it
    cfg = base_config("m", "d.jsonl", tmp_path / "o", use_scattermoe=True)
    result = run_host("validate", write_config(cfg, "b.yaml"))
    assert "axolotl key `use_scattermoe` needs host plugin `scattermoe`" in result.output


def test_axolotl_plugins_without_counterpart_get_one_line_each(run_host, write_config, tmp_path):
    cfg = base_config("m", "d.jsonl", tmp_path / "o", plugins=[
        "axolotl.integrations.grokfast.GrokfastPlugin",
        "axolotl.integrations.spectrum.SpectrumPlugin",
    ])
    out = _fails(run_host, "validate", write_config(cfg))
    assert "2 problems" in out
    assert "axolotl plugin `axolotl.integrations.grokfast.GrokfastPlugin` has no host counterpart" in out
    assert "axolotl plugin `axolotl.integrations.spectrum.SpectrumPlugin` has no host counterpart" in out


def test_cut_cross_entropy_is_read_as_liger_fused_linear_cross_entropy(run_host, write_config, tmp_path):
    from host.axolotl_keys import PLUGINS, TABLE

    assert PLUGINS["axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"].plugin == "liger"
    assert TABLE["cut_cross_entropy"].target == "liger_fused_linear_cross_entropy"
    # without the plugin, axolotl ignores the key (its default is true): a no-op
    result = run_host("validate", write_config(base_config("m", "d.jsonl", tmp_path / "o", cut_cross_entropy=True)))
    assert result.exit_code == 0 and "do nothing at these values: cut_cross_entropy: true" in result.output


def test_installed_plugin_declares_its_axolotl_names(run_host, write_config, local_plugin, tmp_path):
    site = local_plugin("fancy", """
        from pydantic import BaseModel

        from host import hookimpl
    """)
    (site / "host_plugin_fancy-0.1.0.dist-info" / "entry_points.txt").write_text(
        "[host.plugins]\nfancy = host_plugin_fancy\n\n"
        "[host.axolotl]\naxolotl.integrations.fancy.FancyPlugin = host_plugin_fancy\nuse_fancy = host_plugin_fancy\n"
    )
    cfg = base_config("m", "d.jsonl", tmp_path / "o", plugins=["axolotl.integrations.fancy.FancyPlugin"], use_fancy=True)
    result = run_host("validate", write_config(cfg))
    assert result.exit_code == 0, result.output
    assert "plugins:\n- fancy\n" in result.output
    cfg = base_config("m", "d.jsonl", tmp_path / "o", use_fancy=True)
    result = run_host("validate", write_config(cfg, "b.yaml"))
    assert "axolotl key `use_fancy` needs host plugin `fancy`" in result.output


def test_key_that_turns_a_plugin_on(run_host, write_config, local_plugin, tmp_path):
    site = local_plugin("quanty", """
        from pydantic import BaseModel

        from host import hookimpl

        class Cfg(BaseModel):
            load_quanty: bool = False

        @hookimpl
        def config_model():
            return Cfg
    """)
    (site / "host_plugin_quanty-0.1.0.dist-info" / "entry_points.txt").write_text(
        "[host.plugins]\nquanty = host_plugin_quanty\n\n[host.axolotl_enables]\nload_quanty = host_plugin_quanty\n"
    )
    result = run_host("validate", write_config(base_config("m", "d.jsonl", tmp_path / "o", load_quanty=True)))
    assert result.exit_code == 0, result.output
    assert "`load_quanty` turns on host plugin `quanty`" in result.output and "plugins:\n- quanty\n" in result.output
    # null (unset) turns nothing on
    result = run_host("validate", write_config(base_config("m", "d.jsonl", tmp_path / "o", load_quanty=None), "b.yaml"))
    assert result.exit_code == 0 and "turns on" not in result.output and "plugins: []" in result.output
