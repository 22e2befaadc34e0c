"""wandb_* and use_tensorboard reach the Trainer's report_to; the logged runs are read back."""

import json

import pytest

from host.testing import base_config


def test_wandb_offline_and_tensorboard_runs_are_written(run_host, write_config, tiny_model, text_file, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for var in ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_DIR", "WANDB_MODE", "WANDB_ENTITY"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "out"
    cfg = base_config(tiny_model("qwen3"), text_file, out, max_steps=4, save_strategy="no", wandb_project="host-test",
                      wandb_name="tiny-run", wandb_mode="offline", wandb_entity=None, use_tensorboard=True)
    result = run_host("train", write_config(cfg))
    assert result.exit_code == 0, result.output
    losses = [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h] \
        if (out / "trainer_state.json").exists() else None

    events = sorted((out / "runs").rglob("events.out.tfevents.*"))
    assert events, list(out.rglob("*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tb_loss = [e.value for e in acc.Scalars("train/loss")]
    assert len(tb_loss) == 4

    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir())
    summary = json.loads((runs[0] / "files" / "wandb-summary.json").read_text())
    assert summary["train/global_step"] == 4
    assert summary["train/loss"] == pytest.approx(tb_loss[-1], rel=1e-5)
    meta = (runs[0] / "files" / "wandb-metadata.json").read_text()
    assert "tiny-run" in meta or "tiny-run" in (runs[0] / "files" / "config.yaml").read_text()
    assert losses is None or losses[-1] == pytest.approx(tb_loss[-1], rel=1e-5)


def test_logging_packages_checked_at_validate(run_host, write_config, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "tensorboard") else real(name, *a))
    result = run_host("validate", write_config(base_config("m", "d.jsonl", tmp_path / "o", wandb_project="p", use_tensorboard=True)))
    assert result.exit_code == 2
    assert "wandb_project: the wandb package is not installed; pip install 'host[logging]'" in result.output
    assert "use_tensorboard: the tensorboard package is not installed" in result.output
