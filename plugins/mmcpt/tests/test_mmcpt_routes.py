"""Each route end to end through the real `host train` CLI with a tiny Gemma 3 VL model."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
from host_plugin_mmcpt import testing as mmt
from host_plugin_mmcpt.testing import entry, summary


def test_nonstreaming_epochs_loss_falls_and_cache_reused(vl_model, mm_data, write_config, run_host, tmp_path,
                                                         image_stats):
    out, prep = tmp_path / "out", tmp_path / "prep"
    cfg = mmt.mm_config(vl_model, out, datasets=[entry(mm_data)], num_epochs=2, dataset_prepared_path=str(prep))
    result = run_host("train", write_config(cfg))
    assert result.exit_code == 0, result.output
    s = summary(out)
    assert s["steps"] == 2 * 24 // 4  # from the dataset length and num_epochs: no max_steps
    assert s["final_train_loss"] < s["first_train_loss"] - 0.5
    # preparation read image headers only; the collator decoded every image once per epoch
    assert image_stats.headers == 18 and image_stats.loads == 2 * 18
    (cache,) = [p for p in prep.iterdir() if p.is_dir()]
    ds = datasets.load_from_disk(str(cache / "data"))
    assert {"input_ids", "attention_mask", "labels", "_mm_text", "images"} <= set(ds.column_names)
    assert all(isinstance(x, list) for x in ds["images"])  # references, not decoded images
    # a second run prepares nothing: no image header is read again
    image_stats.reset()
    cfg2 = dict(cfg, output_dir=str(tmp_path / "out2"), num_epochs=1)
    result = run_host("train", write_config(cfg2, "cfg2.yaml"))
    assert result.exit_code == 0, result.output
    assert image_stats.headers == 0 and image_stats.loads == 18
    assert "loading prepared dataset" in result.output or len(list(prep.iterdir())) == 1


def test_pretokenized_rows_skip_prepare(vl_model, mm_data, processor, write_config, run_host, tmp_path):
    from host_plugin_mmcpt.encode import ImageTokenSpec, mask_labels

    spec = ImageTokenSpec.from_processor(processor)
    rows = []
    for r in (json.loads(x) for x in (mm_data / "data.jsonl").read_text().splitlines()):
        text = r["text"] + processor.tokenizer.eos_token
        ids = processor.tokenizer(text)["input_ids"]
        rows.append({"_mm_text": text, "images": r["images"], "input_ids": ids, "attention_mask": [1] * len(ids),
                     "labels": mask_labels(ids, set(spec.masked_ids))})
    data = mmt.write_jsonl(tmp_path / "pretok.jsonl", rows)
    out = tmp_path / "out"
    cfg = mmt.mm_config(vl_model, out, skip_prepare_dataset=True, num_epochs=1,
                        datasets=[{"path": str(data), "type": "multimodal_pretrain",
                                   "image_base_dir": str(mm_data / "images")}])
    result = run_host("train", write_config(cfg))
    assert result.exit_code == 0, result.output
    s = summary(out)
    assert s["steps"] == 6
    assert s["final_train_loss"] < s["first_train_loss"]
    # a malformed pre-tokenized row is named
    rows[3]["labels"] = rows[3]["labels"][:-1]
    mmt.write_jsonl(data, rows)
    result = run_host("train", write_config(dict(cfg, output_dir=str(tmp_path / "o2")), "bad.yaml"))
    assert result.exit_code == 2
    assert "row 3" in result.output and "lengths" in result.output


def _stream_cfg(vl_model, data_glob, images, out, prep, **kw):
    return mmt.mm_config(
        vl_model, out, micro_batch_size=2, save_steps=3, streaming=True,
        pretraining_dataset=[{"path": data_glob, "type": "multimodal_pretrain", "image_base_dir": str(images)}],
        **({"dataset_prepared_path": str(prep)} if prep else {}), **kw)


def _indices(refs) -> set[int]:
    return {int(Path(r).stem[1:]) for _, r in refs}


def test_streaming_resume_from_cache_reprocesses_nothing(vl_model, write_config, run_host, tmp_path, image_stats):
    from host_plugin_mmcpt.images import STATS

    images = tmp_path / "images"
    rows = mmt.make_rows(images, 40, prefix="s", text_every=0)  # every row has its own image sN.png
    mmt.write_jsonl(tmp_path / "shards" / "a.jsonl", rows[:15])
    mmt.write_jsonl(tmp_path / "shards" / "b.jsonl", rows[15:])
    out, prep = tmp_path / "out", tmp_path / "prep"
    glob = str(tmp_path / "shards" / "*.jsonl")
    cfg = _stream_cfg(vl_model, glob, images, out, prep, max_steps=3, ignore_data_skip=True)
    result = run_host("train", write_config(cfg, "s1.yaml"))
    assert result.exit_code == 0, result.output
    assert summary(out)["steps"] == 3
    first = [r for k, r in STATS.opened if k == "load"]
    assert _indices([("", r) for r in first]) >= set(range(6))  # samples 0-5 trained in run 1
    meta = json.loads(next(prep.glob("mmcpt-stream-*/meta.json")).read_text())
    assert meta["rows"] >= 6
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["MMCPTStreamState"]["args"]["samples_consumed"] == 6

    STATS.reset()
    cfg2 = dict(cfg, max_steps=9, resume_from_checkpoint=True)
    result = run_host("train", write_config(cfg2, "s2.yaml"))
    assert result.exit_code == 0, result.output
    s = summary(out)
    assert s["steps"] == 9 and s["final_train_loss"] < s["first_train_loss"]
    touched = _indices(STATS.opened)  # decoded images and header reads alike
    assert touched and not touched & set(range(6)), sorted(touched)  # nothing already trained is touched
    loaded = _indices([x for x in STATS.opened if x[0] == "load"])
    assert set(range(6, 18)) <= loaded  # and the resumed run trains exactly the next samples
    assert "Fast-forwarding" not in result.output


def test_streaming_resume_fast_forward_without_ignore_data_skip(vl_model, write_config, run_host, tmp_path,
                                                                image_stats):
    """The baseline the cache avoids: HF's fast-forward re-decodes the images of trained samples."""
    from host_plugin_mmcpt.images import STATS

    images = tmp_path / "images"
    mmt.write_jsonl(tmp_path / "d.jsonl", mmt.make_rows(images, 24, prefix="s", text_every=0))
    out = tmp_path / "out"
    cfg = _stream_cfg(vl_model, str(tmp_path / "d.jsonl"), images, out, None, max_steps=3)
    assert run_host("train", write_config(cfg, "s1.yaml")).exit_code == 0
    STATS.reset()
    result = run_host("train", write_config(dict(cfg, max_steps=4, resume_from_checkpoint=True), "s2.yaml"))
    assert result.exit_code == 0, result.output
    assert set(range(6)) <= _indices([x for x in STATS.opened if x[0] == "load"])


def test_streaming_under_two_processes(vl_model, write_config, tmp_path):
    """Under torchrun each rank reads its own shard of the stream's batches (the host turns off
    accelerate's rank-0 dispatch, which concatenates and re-slices batches and cannot survive
    multimodal ones; the plugin's callback refuses to run if it ever sees a dispatcher)."""
    import os
    import socket
    import subprocess
    import sys

    images = tmp_path / "images"
    mmt.write_jsonl(tmp_path / "d.jsonl", mmt.make_rows(images, 8, prefix="s"))
    cfg = write_config(_stream_cfg(vl_model, str(tmp_path / "d.jsonl"), images, tmp_path / "out", None, max_steps=1))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           f"--master-port={port}", "-m", "host", "train", str(cfg)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 1
