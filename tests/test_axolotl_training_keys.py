"""axolotl's training keys: adapter targets, starting adapter, checkpoints, early stopping, pass-throughs."""

import json

import yaml

from host.testing import base_config


def _cfg(tiny_model, text_file, out, **overrides):
    return base_config(tiny_model("qwen3"), text_file, out, **overrides)


def test_lora_without_targets_is_a_validation_error(run_host, write_config, tmp_path):
    result = run_host("validate", write_config(base_config("m", "d.jsonl", tmp_path / "o", lora_target_modules=None)))
    assert result.exit_code == 2
    assert "adapter: lora has nothing to target; set lora_target_linear: true" in result.output


def test_lora_target_linear_targets_every_linear_layer(run_host, write_config, tiny_model, text_file, tmp_path):
    out = tmp_path / "out"
    cfg = _cfg(tiny_model, text_file, out, lora_target_modules=None, lora_target_linear=True, max_steps=1, save_strategy="no")
    result = run_host("train", write_config(cfg))
    assert result.exit_code == 0, result.output
    targets = set(json.loads((out / "adapter_config.json").read_text())["target_modules"])
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_lora_model_dir_starts_from_the_saved_adapter(run_host, write_config, tiny_model, text_file, tmp_path):
    from safetensors.torch import load_file

    first = tmp_path / "first"
    assert run_host("train", write_config(_cfg(tiny_model, text_file, first, max_steps=2, save_strategy="no"), "a.yaml")).exit_code == 0
    second = tmp_path / "second"
    # learning rate 0: the adapter that comes out is the one that went in, iff it was loaded
    cfg = _cfg(tiny_model, text_file, second, max_steps=1, learning_rate=0.0, save_strategy="no", lora_model_dir=str(first))
    result = run_host("train", write_config(cfg, "b.yaml"))
    assert result.exit_code == 0, result.output
    a, b = load_file(first / "adapter_model.safetensors"), load_file(second / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert any(k.endswith("lora_B.weight") and a[k].abs().sum() > 0 for k in a)  # trained, not a fresh zero B
    bad = _cfg(tiny_model, text_file, tmp_path / "third", lora_model_dir=str(tmp_path))
    result = run_host("validate", write_config(bad, "c.yaml"))
    assert result.exit_code == 2 and "holds no adapter_config.json" in result.output


def test_one_checkpoint_per_epoch_by_default(run_host, write_config, tiny_model, text_file, tmp_path):
    out = tmp_path / "out"
    assert run_host("train", write_config(_cfg(tiny_model, text_file, out, max_steps=2))).exit_code == 0
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]
    none = tmp_path / "none"
    assert run_host("train", write_config(_cfg(tiny_model, text_file, none, max_steps=2, save_strategy="no"), "n.yaml")).exit_code == 0
    assert not list(none.glob("checkpoint-*"))


def test_save_total_limit_keeps_the_newest(run_host, write_config, tiny_model, text_file, tmp_path):
    out = tmp_path / "out"
    cfg = _cfg(tiny_model, text_file, out, max_steps=3, save_steps=1, save_total_limit=1)
    assert run_host("train", write_config(cfg)).exit_code == 0
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]


def test_early_stopping_patience_stops_a_flat_run(run_host, write_config, tiny_model, text_file, tmp_path):
    out = tmp_path / "out"
    # learning rate 0: eval_loss never improves after the first evaluation, so patience 2 stops at step 3
    cfg = _cfg(tiny_model, text_file, out, max_steps=10, learning_rate=0.0, val_set_size=0.2, eval_steps=1,
               early_stopping_patience=2, save_strategy="no")
    result = run_host("train", write_config(cfg))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run_summary.json").read_text())["steps"] == 3
    result = run_host("validate", write_config(_cfg(tiny_model, text_file, tmp_path / "x", early_stopping_patience=2), "b.yaml"))
    assert result.exit_code == 2 and "early_stopping_patience: needs evaluation" in result.output


def test_pass_through_training_arguments(write_config, tiny_model, text_file, tmp_path):
    from host.config import load_config
    from host.train import training_arguments

    cfg = _cfg(tiny_model, text_file, tmp_path / "o", max_grad_norm=0.3, adam_beta2=0.95, adam_epsilon=1e-6, tf32=True,
               gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}, save_total_limit=2,
               logging_nan_inf_filter=False)
    cfg, _, _ = load_config(write_config(cfg))
    args = training_arguments(cfg, has_eval=False)
    assert (args.max_grad_norm, args.adam_beta2, args.adam_epsilon, args.save_total_limit) == (0.3, 0.95, 1e-6, 2)
    assert args.logging_nan_inf_filter is False
    assert args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert args.save_strategy == "epoch"
    assert not args.tf32  # TF32 is a GPU matmul mode: nothing to switch on CPU


def test_axolotl_placeholders_validate(run_host, write_config, tmp_path):
    """The shape of a published axolotl config's tail: empty placeholders and off switches."""
    text = yaml.safe_dump(base_config("m", "d.jsonl", tmp_path / "o")) + (
        "wandb_project:\nwandb_entity:\nwandb_watch:\nwandb_name:\nwandb_log_model:\n"
        "strict: false\nload_in_8bit: false\nfp16:\nlora_model_dir:\nresume_from_checkpoint:\n"
        "tf32: false\ngradient_checkpointing_kwargs:\n  use_reentrant: false\nwarmup_steps: 10\n"
    )
    path = tmp_path / "ax.yaml"
    path.write_text(text)
    result = run_host("validate", path)
    assert result.exit_code == 0, result.output
    assert "wandb_watch: (empty)" in result.output and "load_in_8bit: false" in result.output
