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

    events = sorted((out / "runs").rglob("events.out.tfevents.*"))
    assert events, list(out.rglob("*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tb_loss = [e.value for e in acc.Scalars("train/loss")]
    assert len(tb_loss) == 4

    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir())
    records = list(_wandb_records(next(runs[0].glob("run-*.wandb"))))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.display_name, run.project) == ("tiny-run", "host-test")
    history = [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
                for r in records if r.WhichOneof("record_type") == "history"]
    wb_loss = [h["train/loss"] for h in history if "train/loss" in h]
    assert wb_loss == pytest.approx(tb_loss, rel=1e-5)


def _wandb_records(path):
    """The protobuf records of an offline run file (a 7-byte header, then LevelDB-log blocks of
    32 KiB whose chunks are checksum, length, type)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST chunk ends a record
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def test_logging_packages_checked_at_validate(run_host, write_config, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "tensorboard") else real(name, *a))
    result = run_host("validate", write_config(base_config("m", "d.jsonl", tmp_path / "o", wandb_project="p", use_tensorboard=True)))
    assert result.exit_code == 2
    assert "wandb_project: the wandb package is not installed; pip install 'host[logging]'" in result.output
    assert "use_tensorboard: the tensorboard package is not installed" in result.output
