"""Cache keys follow the processor and the multimodal fields; the stream cache seeks and survives kills."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from host import data as host_data
from host.config import load_config
from host_plugin_mmcpt import testing as mmt
from host_plugin_mmcpt.stream import JsonlSource, StreamCache


def _processor_copy(src: Path, dst: Path, edit=None, add_token: str | None = None) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    if edit:
        pc = json.loads((dst / "processor_config.json").read_text())
        edit(pc)
        (dst / "processor_config.json").write_text(json.dumps(pc))
    if add_token:
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(str(dst))
        proc.tokenizer.add_tokens([add_token])
        proc.save_pretrained(str(dst))
    return dst


def _prepare(model_dir, mm_data, tmp_path, write_config, **entry_kw):
    from host.model import load_tokenizer_and_processor

    cfg_dict = mmt.mm_config(model_dir, tmp_path / "out", datasets=[mmt.entry(mm_data, **entry_kw)],
                             dataset_prepared_path=str(tmp_path / "prep"))
    cfg, pm, _ = load_config(write_config(cfg_dict))
    tok, proc = load_tokenizer_and_processor(cfg)
    before = {p.name for p in (tmp_path / "prep").iterdir()} if (tmp_path / "prep").exists() else set()
    host_data.prepare(cfg, pm, tok, proc)
    after = {p.name for p in (tmp_path / "prep").iterdir()}
    return after - before, pm, cfg, tok, proc


def test_prepared_cache_is_processor_and_field_sensitive(vl_model, mm_data, tmp_path, write_config, image_stats):
    new, *_ = _prepare(vl_model, mm_data, tmp_path, write_config)
    assert len(new) == 1
    again, *_ = _prepare(vl_model, mm_data, tmp_path, write_config)
    assert again == set()  # same processor and entry: reused
    variants = {
        "image processor size": _processor_copy(
            vl_model, tmp_path / "p1", lambda pc: pc["image_processor"].update(size={"height": 16, "width": 16})),
        "image normalisation": _processor_copy(
            vl_model, tmp_path / "p2", lambda pc: pc["image_processor"].update(image_mean=[0.4, 0.4, 0.4])),
        "image_seq_length": _processor_copy(vl_model, tmp_path / "p3", lambda pc: pc.update(image_seq_length=9)),
        "tokenizer vocabulary": _processor_copy(vl_model, tmp_path / "p4", add_token="<extra_token>"),
    }
    for name, model_dir in variants.items():
        new, *_ = _prepare(model_dir, mm_data, tmp_path, write_config)
        assert len(new) == 1, f"a changed {name} reused a stale prepared set"
    for field in ({"image_token": "<start_of_image>"}, {"text_column": "text", "image_column": "images",
                                                         "add_eos": False}):
        new, *_ = _prepare(vl_model, mm_data, tmp_path, write_config, **field)
        assert len(new) == 1, field
    other_base = tmp_path / "images2"
    shutil.copytree(mm_data / "images", other_base)
    new, *_ = _prepare(vl_model, mm_data, tmp_path, write_config, image_base_dir=str(other_base))
    assert len(new) == 1


def test_strategy_fingerprint_is_stable_and_processor_sensitive(vl_model, tmp_path, processor):
    from transformers import AutoProcessor

    from host_plugin_mmcpt.encode import ImageTokenSpec, processor_fingerprint

    fp = processor_fingerprint(processor, ImageTokenSpec.from_processor(processor))
    again = AutoProcessor.from_pretrained(str(vl_model))
    assert processor_fingerprint(again, ImageTokenSpec.from_processor(again)) == fp
    changed = AutoProcessor.from_pretrained(
        str(_processor_copy(vl_model, tmp_path / "q", lambda pc: pc["image_processor"].update(resample=3))))
    assert processor_fingerprint(changed, ImageTokenSpec.from_processor(changed))["settings"] != fp["settings"]


def _row(i: int) -> dict:
    return {"input_ids": [i, i + 1], "n": i}


def test_stream_cache_seeks_and_trims_after_a_kill(tmp_path, monkeypatch):
    monkeypatch.setattr(StreamCache, "SHARD_ROWS", 4)
    monkeypatch.setattr(StreamCache, "COMMIT_EVERY", 3)
    key = {"k": 1}
    cache = StreamCache(tmp_path, key, {"file": 0, "offset": 0, "line": 0})
    for i in range(10):
        cache.append(_row(i), {"file": 0, "offset": i + 1, "line": i + 1}, 0)
    cache.commit()
    assert sorted(p.name for p in cache.dir.glob("rows-*")) == ["rows-000000.jsonl", "rows-000001.jsonl",
                                                                 "rows-000002.jsonl"]
    assert [r["n"] for r in cache.read(6)] == [6, 7, 8, 9]
    assert [r["n"] for r in cache.read(10)] == []
    for i in range(10, 12):  # appended but the process dies before the next commit (every 3 rows)
        cache.append(_row(i), {"file": 0, "offset": i + 1, "line": i + 1}, 0)
    cache.flush()
    cache._lockfh.close()  # the dead process's lock goes away
    reopened = StreamCache(tmp_path, key, {})
    assert reopened.rows == 10 and reopened.meta["source"]["line"] == 10
    cache2 = StreamCache(tmp_path, key, {})  # a second process on the same cache: reads only
    assert not cache2.writable
    reopened.append(_row(99), {"file": 0, "offset": 0, "line": 0}, 0)
    reopened.commit()
    assert [r["n"] for r in reopened.read(9)] == [9, 99]
    reopened._lockfh.close()
    cache2._lockfh.close()


def test_stream_cache_trims_uncommitted_tail(tmp_path, monkeypatch):
    monkeypatch.setattr(StreamCache, "SHARD_ROWS", 4)
    monkeypatch.setattr(StreamCache, "COMMIT_EVERY", 100)
    cache = StreamCache(tmp_path, {"k": 2}, {"line": 0})
    for i in range(6):
        cache.append(_row(i), {"line": i + 1}, 0)
    cache.commit()
    for i in range(6, 9):  # rows 6-8 reach the disk but are never committed
        cache.append(_row(i), {"line": i + 1}, 0)
    cache.flush()
    cache._lockfh.close()
    again = StreamCache(tmp_path, {"k": 2}, {})
    assert again.rows == 6 and [r["n"] for r in again.read(4)] == [4, 5]
    assert not (again.dir / "rows-000002.jsonl").exists()
    again.append(_row(6), {"line": 7}, 0)
    again.commit()
    assert [r["n"] for r in again.read(0)] == [0, 1, 2, 3, 4, 5, 6]
    again._lockfh.close()


def test_jsonl_source_resumes_by_offset(tmp_path):
    a = mmt.write_jsonl(tmp_path / "a.jsonl", [{"i": i} for i in range(3)])
    b = mmt.write_jsonl(tmp_path / "b.jsonl", [{"i": i} for i in range(3, 6)])
    src = JsonlSource([str(a), str(b)], "w")
    items = list(src.iterate(src.start_state()))
    assert [r["i"] for r, *_ in items] == list(range(6))
    assert [(Path(n).name, k) for _, n, k, _ in items][2:4] == [("a.jsonl", 2), ("b.jsonl", 0)]
    state = items[3][3]
    assert [r["i"] for r, *_ in src.iterate(state)] == [4, 5]


def test_stream_resume_without_cache_decodes_no_image(processor, tmp_path, image_stats):
    from types import SimpleNamespace

    from host_plugin_mmcpt.config import MultimodalPretrainDataset
    from host_plugin_mmcpt.encode import ImageTokenSpec, RowEncoder
    from host_plugin_mmcpt.stream import MMStream

    images = tmp_path / "images"
    data = mmt.write_jsonl(tmp_path / "d.jsonl", mmt.make_rows(images, 8, prefix="s", text_every=0))
    entry = MultimodalPretrainDataset(path=str(data), image_base_dir=str(images), measure_images=False)
    cfg = SimpleNamespace(sequence_len=128)
    encoder = RowEncoder(cfg, entry, processor.tokenizer, ImageTokenSpec.from_processor(processor), str(images), 5)
    stream = MMStream(encoder, JsonlSource([str(data)], "w"), None, start=5, skip_bad=False, where="w")
    assert [r["_mm_row"] for r in stream] == [5, 6, 7]
    assert stream.stats["rows_skipped_by_encoding"] == 5 and image_stats.opened == []
    assert [r["_mm_row"] for r in stream][:2] == [0, 1]  # a later pass (next epoch) starts over


@pytest.mark.parametrize("complete", [True, False])
def test_stream_wraps_around_a_complete_cache(processor, tmp_path, complete):
    from types import SimpleNamespace

    from host_plugin_mmcpt.config import MultimodalPretrainDataset
    from host_plugin_mmcpt.encode import ImageTokenSpec, RowEncoder
    from host_plugin_mmcpt.stream import MMStream

    images = tmp_path / "images"
    data = mmt.write_jsonl(tmp_path / "d.jsonl", mmt.make_rows(images, 5, prefix="s", text_every=0))
    entry = MultimodalPretrainDataset(path=str(data), image_base_dir=str(images))
    enc = RowEncoder(SimpleNamespace(sequence_len=128), entry, processor.tokenizer,
                     ImageTokenSpec.from_processor(processor), str(images), 5)
    src = JsonlSource([str(data)], "w")
    cache = StreamCache(tmp_path / "c", {"k": 3}, src.start_state())
    assert [r["_mm_row"] for r in MMStream(enc, src, cache, 0, False, "w")] == [0, 1, 2, 3, 4]
    assert cache.meta["complete"] and cache.rows == 5
    if not complete:
        cache.meta["complete"] = False
    stream = MMStream(enc, src, cache, 7, False, "w")
    rows = [r["_mm_row"] for r in stream]
    assert rows == ([2, 3, 4] if complete else [])  # 7 % 5 = 2; an unfinished cache cannot wrap yet
    cache._lockfh.close()


def test_parquet_stream_through_datasets_resumes(processor, tmp_path, image_stats):
    from types import SimpleNamespace

    import datasets

    from host_plugin_mmcpt.config import MultimodalPretrainDataset
    from host_plugin_mmcpt.encode import ImageTokenSpec, RowEncoder
    from host_plugin_mmcpt.stream import DatasetsSource, MMStream, make_source

    images = tmp_path / "images"
    rows = mmt.make_rows(images, 6, prefix="s", text_every=3)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    entry = MultimodalPretrainDataset(path=str(tmp_path / "d.parquet"), image_base_dir=str(images))
    src = make_source(entry, "w")
    assert isinstance(src, DatasetsSource)
    enc = RowEncoder(SimpleNamespace(sequence_len=128), entry, processor.tokenizer,
                     ImageTokenSpec.from_processor(processor), str(images), 5)
    cache = StreamCache(tmp_path / "c", {"k": 4}, src.start_state())
    it = iter(MMStream(enc, src, cache, 0, False, "w"))
    assert [next(it)["_mm_row"] for _ in range(3)] == [0, 1, 2]
    it.close()  # the run stops mid-stream: the cache keeps what was read
    assert cache.rows == 3 and cache.meta["source"] == {"rows": 3} and not cache.meta["complete"]
    image_stats.reset()
    assert [r["_mm_row"] for r in MMStream(enc, src, cache, 4, False, "w")] == [4, 5]
    assert not any("s00000" in ref or "s00001" in ref for _, ref in image_stats.opened)
    cache._lockfh.close()
