"""The collator: label masking, all-text batches, failures named by row, batch-time length checks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from host.errors import DataError
from host_plugin_mmcpt import testing as mmt
from host_plugin_mmcpt.collate import MultimodalCollator
from host_plugin_mmcpt.config import MultimodalPretrainDataset
from host_plugin_mmcpt.encode import ImageTokenSpec, RowEncoder


def _cfg(**kw):
    base = dict(sequence_len=128, pad_to_sequence_len=False, skip_bad_rows=False, remote_image_timeout=5.0)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.fixture
def rows(processor, tmp_path):
    images = tmp_path / "images"
    mmt.make_png(images / "a.png", (40, 30))
    mmt.make_png(images / "b.png", (20, 50), (20, 200, 20))
    entry = MultimodalPretrainDataset(path="x.jsonl", image_base_dir=str(images))
    spec = ImageTokenSpec.from_processor(processor)
    enc = RowEncoder(_cfg(), entry, processor.tokenizer, spec, str(images), 5.0)
    raw = [
        {"text": "first <start_of_image> a red square and <start_of_image> a green one", "images": ["a.png", "b.png"]},
        {"text": "just some words of text", "images": []},
        {"text": "<start_of_image> caption", "images": ["b.png"]},
    ]
    return [enc.encode(r, i, "x.jsonl") for i, r in enumerate(raw)]


def test_label_masking(processor, rows):
    tok = processor.tokenizer
    batch = MultimodalCollator(_cfg(), tok, processor)(rows)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert batch["pixel_values"].shape[0] == 3 and "token_type_ids" in batch
    layout = {tok.convert_tokens_to_ids(t) for t in (mmt.BOI, mmt.EOI, mmt.SOFT)}
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            i, lab = int(ids[b, t]), int(labels[b, t])
            if mask[b, t] == 0 or i in layout:
                assert lab == -100, (b, t, i)
            else:
                assert lab == i, (b, t, i)
    soft = tok.convert_tokens_to_ids(mmt.SOFT)
    assert int((ids[0] == soft).sum()) == 2 * processor.image_seq_length  # two images expanded
    assert int((ids[1] == soft).sum()) == 0 and int(mask[1].sum()) < ids.shape[1]  # text row, padded
    eos = tok.eos_token_id
    assert all(int(labels[b][int(mask[b].sum()) - 1]) == eos for b in range(3))  # right padding, eos trained
    # the prepared length (with the calibrated image expansion) equals what the processor produced
    spec = ImageTokenSpec.from_processor(processor)
    for b, row in enumerate(rows):
        sizes = [(30, 40), (50, 20)] if b == 0 else ([(50, 20)] if b == 2 else [])
        assert len(row["input_ids"]) + spec.image_tokens(sizes) == int(mask[b].sum())


def test_all_text_batches_skip_the_image_processor(processor, rows, monkeypatch, image_stats):
    calls = []
    cls = type(processor.image_processor)
    orig = cls.__call__
    monkeypatch.setattr(cls, "__call__", lambda self, *a, **k: calls.append(1) or orig(self, *a, **k))
    collate = MultimodalCollator(_cfg(), processor.tokenizer, processor)
    calls.clear()
    text_batch = collate([rows[1], rows[1]])
    assert calls == [] and image_stats.loads == 0
    assert "pixel_values" not in text_batch and text_batch["token_type_ids"].abs().sum() == 0
    collate(rows)
    assert calls == [1] and image_stats.loads == 3


def test_processor_failure_names_the_row(processor, rows):
    bad = dict(rows[2], _mm_text=rows[2]["_mm_text"] + " <start_of_image>", _mm_row=17)  # 2 placeholders, 1 image
    with pytest.raises(DataError, match=r"x\.jsonl: row 17: the processor failed on this row") as info:
        MultimodalCollator(_cfg(), processor.tokenizer, processor)([rows[0], bad, rows[1]])
    assert "b.png" in str(info.value)


def test_batch_time_failures(processor, rows, tmp_path):
    (tmp_path / "images" / "a.png").write_bytes(b"broken")
    collate = MultimodalCollator(_cfg(), processor.tokenizer, processor)
    with pytest.raises(DataError, match=r"x\.jsonl: row 0: image 'a\.png' is not a readable image"):
        collate(rows)
    skipping = MultimodalCollator(_cfg(skip_bad_rows=True), processor.tokenizer, processor)
    batch = skipping(rows)
    assert batch["input_ids"].shape[0] == 2 and skipping.stats["dropped_rows"] == 1
    with pytest.raises(DataError, match="every row of a batch was bad"):
        skipping([rows[0]])


def test_batch_time_length_check_and_padding(processor, rows):
    short = MultimodalCollator(_cfg(sequence_len=20), processor.tokenizer, processor)
    with pytest.raises(DataError, match=r"row 0: \d+ tokens after image expansion, more than sequence_len=20"):
        short(rows)
    padded = MultimodalCollator(_cfg(sequence_len=64, pad_to_sequence_len=True), processor.tokenizer, processor)
    batch = padded([rows[1], rows[2]])
    assert batch["input_ids"].shape == (2, 64) and int(batch["labels"][0, -1]) == -100
    assert torch.equal(batch["labels"] != -100, (batch["attention_mask"] == 1) & (batch["labels"] == batch["input_ids"]))
