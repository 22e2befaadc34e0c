"""axolotl's trainer/data keys: exact deduplication, optim_args, activation offloading, N-D parallelism sizes."""

import logging

import pytest

from host.config import validate
from host.data import prepare
from host.testing import write_jsonl


def _prepare(make_plugin_manager, tokenizer, **cfg):
    pm = make_plugin_manager([])
    return prepare(validate({"base_model": "unused", **cfg}, pm), pm, tokenizer)


# --- dataset_exact_deduplication --------------------------------------------------------------

def _chats(n):
    return [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]}
            for i in range(n)]


def test_exact_deduplication_drops_repeats_within_and_across_train_and_eval(make_plugin_manager, tiny_tokenizer, tmp_path, caplog):
    rows = _chats(12)
    a = write_jsonl(tmp_path / "a.jsonl", rows + rows[:4] + rows[:2])  # 6 repeats within one file
    b = write_jsonl(tmp_path / "b.jsonl", rows[5:9])  # 4 repeats across entries
    entries = [{"path": str(a), "type": "chat_template"}, {"path": str(b), "type": "chat_template"}]
    kwargs = dict(sequence_len=64, val_set_size=0.25, datasets=entries, seed=3)
    train, ev = _prepare(make_plugin_manager, tiny_tokenizer, **kwargs)
    assert len(train) + len(ev) == 22  # without the key every copy stays
    with caplog.at_level(logging.INFO, logger="host.data"):
        train, ev = _prepare(make_plugin_manager, tiny_tokenizer, dataset_exact_deduplication=True, **kwargs)
    assert len(train) + len(ev) == 12
    seen = [tuple(r) for r in train["input_ids"]] + [tuple(r) for r in ev["input_ids"]]
    assert len(set(seen)) == len(seen)  # nothing repeats within train, within eval or between them
    assert "dataset_exact_deduplication: dropped 10 of 22 datasets row(s)" in caplog.text


def test_exact_deduplication_keys_the_prepared_cache(make_plugin_manager, tiny_tokenizer, tmp_path):
    rows = _chats(4)
    f = write_jsonl(tmp_path / "a.jsonl", rows + rows)
    kwargs = dict(sequence_len=64, datasets=[{"path": str(f), "type": "chat_template"}], dataset_prepared_path=str(tmp_path / "prep"))
    assert len(_prepare(make_plugin_manager, tiny_tokenizer, **kwargs)[0]) == 8
    assert len(_prepare(make_plugin_manager, tiny_tokenizer, dataset_exact_deduplication=True, **kwargs)[0]) == 4
    assert len(_prepare(make_plugin_manager, tiny_tokenizer, **kwargs)[0]) == 8  # its own cache entry, not the deduplicated one
    assert len(list((tmp_path / "prep").iterdir())) == 2


def test_exact_deduplication_compares_every_column():
    """Same tokens with other labels (or another extra column) is another row, as in axolotl (whole rows)."""
    import datasets

    from host.dedup import deduplicate

    ds = datasets.Dataset.from_dict({
        "input_ids": [[1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3]],
        "labels": [[-100, 2, 3], [-100, 2, 3], [1, 2, 3], [-100, 2, 3]],
        "source": ["a", "a", "a", "b"],
    })
    out = deduplicate(ds)
    assert out["labels"] == [[-100, 2, 3], [1, 2, 3], [-100, 2, 3]] and out["source"] == ["a", "a", "b"]
