"""Built-in dataset types, the length policy, data errors and the prepared-dataset cache."""

import copy
import json

import pytest

from host.config import validate
from host.data import prepare
from host.errors import DataError
from host.testing import base_config, write_jsonl

CHATS = [
    {"messages": [{"role": "user", "content": "What is a list?"}, {"role": "assistant", "content": "An ordered sequence."}]},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a queue."},
            {"role": "assistant", "content": "FIFO."},
            {"role": "user", "content": "And a stack?"},
            {"role": "assistant", "content": "LIFO."},
        ]
    },
]


def _prepare(make_plugin_manager, tokenizer, **cfg):
    pm = make_plugin_manager([])
    data = {"base_model": "unused", **cfg}
    return prepare(validate(data, pm), pm, tokenizer)


def test_completion_chunks_with_eos(make_plugin_manager, tiny_tokenizer, tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "alpha beta gamma " * 20}, {"text": "delta epsilon"}])
    train, ev = _prepare(make_plugin_manager, tiny_tokenizer, sequence_len=16, datasets=[{"path": str(f), "type": "completion"}])
    assert ev is None
    assert all(len(r) == 16 for r in train["input_ids"])
    flat = [t for r in train["input_ids"] for t in r]
    assert flat.count(tiny_tokenizer.eos_token_id) >= 1
    assert train["labels"] == train["input_ids"]


def test_chat_template_labels_only_assistant(make_plugin_manager, tiny_tokenizer, tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", CHATS)
    train, _ = _prepare(make_plugin_manager, tiny_tokenizer, sequence_len=256, datasets=[{"path": str(f), "type": "chat_template"}])
    row = train[1]
    learned = tiny_tokenizer.decode([t for t, l in zip(row["input_ids"], row["labels"]) if l != -100])
    assert learned == "FIFO.<|end|>LIFO.<|end|>"
    assert "Name a queue" not in learned


@pytest.mark.parametrize("policy", ["drop", "truncate", "raise"])
def test_excess_length_policy(make_plugin_manager, tiny_tokenizer, tmp_path, policy, caplog):
    f = write_jsonl(tmp_path / "c.jsonl", CHATS)
    short, long = (len(tiny_tokenizer.apply_chat_template(c["messages"], return_dict=True)["input_ids"]) for c in CHATS)
    assert short < long
    seq = (short + long) // 2  # row 0 fits, row 1 does not
    kwargs = dict(sequence_len=seq, excess_length_strategy=policy, datasets=[{"path": str(f), "type": "chat_template"}])
    if policy == "raise":
        with pytest.raises(DataError, match=rf"row 1 has {long} tokens, more than sequence_len={seq}"):
            _prepare(make_plugin_manager, tiny_tokenizer, **kwargs)
        return
    train, _ = _prepare(make_plugin_manager, tiny_tokenizer, **kwargs)
    if policy == "drop":
        assert len(train) == 1 and "dropped 1 row(s)" in caplog.text
    else:
        assert len(train) == 2 and max(len(r) for r in train["input_ids"]) == seq


def test_empty_after_filtering(make_plugin_manager, tiny_tokenizer, tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", CHATS)
    with pytest.raises(DataError, match="no trainable rows left after dropping 2 row"):
        _prepare(make_plugin_manager, tiny_tokenizer, sequence_len=4, datasets=[{"path": str(f), "type": "chat_template"}])


def test_missing_file_and_column(make_plugin_manager, tiny_tokenizer, tmp_path):
    with pytest.raises(DataError, match=r"datasets\[0\].*nope.jsonl.*not found"):
        _prepare(make_plugin_manager, tiny_tokenizer, datasets=[{"path": str(tmp_path / "nope.jsonl"), "type": "completion"}])
    f = write_jsonl(tmp_path / "t.jsonl", [{"body": "x"}])
    with pytest.raises(DataError, match=r"missing column\(s\) \['text'\]; the file has \['body'\]"):
        _prepare(make_plugin_manager, tiny_tokenizer, datasets=[{"path": str(f), "type": "completion"}])


def test_val_split(make_plugin_manager, tiny_tokenizer, text_file):
    train, ev = _prepare(
        make_plugin_manager, tiny_tokenizer, sequence_len=32, val_set_size=0.25,
        datasets=[{"path": str(text_file), "type": "completion"}],
    )
    assert ev is not None and abs(len(ev) / (len(ev) + len(train)) - 0.25) < 0.02


def test_cache_reused_and_invalidated(make_plugin_manager, tiny_tokenizer, tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "one two three four " * 10}])
    cache = tmp_path / "prep"
    kw = dict(sequence_len=8, dataset_prepared_path=str(cache), datasets=[{"path": str(f), "type": "completion"}])
    first, _ = _prepare(make_plugin_manager, tiny_tokenizer, **kw)
    entries = list(cache.iterdir())
    assert len(entries) == 1
    again, _ = _prepare(make_plugin_manager, tiny_tokenizer, **kw)
    assert again["input_ids"] == first["input_ids"] and list(cache.iterdir()) == entries
    # a changed file, sequence_len or tokenizer never reuses the stale cache
    write_jsonl(f, [{"text": "five six seven eight " * 10}])
    changed, _ = _prepare(make_plugin_manager, tiny_tokenizer, **kw)
    assert changed["input_ids"] != first["input_ids"]
    _prepare(make_plugin_manager, tiny_tokenizer, **{**kw, "sequence_len": 16})
    other = copy.deepcopy(tiny_tokenizer)
    other.add_tokens(["<|newtoken|>"])
    _prepare(make_plugin_manager, other, **kw)
    assert len(list(cache.iterdir())) == 4


def test_preprocess_cli_fills_cache(run_host, write_config, tiny_model, text_file, tmp_path):
    cfg = base_config(tiny_model("qwen3_moe"), text_file, tmp_path / "o", dataset_prepared_path=str(tmp_path / "prep"))
    result = run_host("preprocess", write_config(cfg))
    assert result.exit_code == 0, result.output
    assert "prepared" in result.output
    (entry,) = (tmp_path / "prep").iterdir()
    assert json.loads((entry / "host_prepared.json").read_text())["sequence_len"] == 64


def test_data_errors_exit_2(run_host, write_config, tiny_model, tmp_path):
    cfg = base_config(tiny_model("qwen3_moe"), tmp_path / "missing.jsonl", tmp_path / "o", dataset_prepared_path=str(tmp_path / "p"))
    result = run_host("preprocess", write_config(cfg))
    assert result.exit_code == 2 and "missing.jsonl" in result.output and "not found" in result.output


def test_large_files_fingerprinted_without_full_read(monkeypatch, tmp_path):
    import host.data as data_mod
    from host.config import DatasetConfig

    monkeypatch.setattr(data_mod, "FULL_HASH_LIMIT", 8)
    f = tmp_path / "big.txt"
    f.write_bytes(b"a" * (3 << 20))
    entry = DatasetConfig(path=str(f), type="completion")
    before = data_mod.files_fingerprint(entry)
    f.write_bytes(b"a" * (3 << 20) + b"b")
    assert data_mod.files_fingerprint(entry) != before


_STREAMING_PLUGIN = """
from host import hookimpl
from host.config import DatasetConfig


class Stream(DatasetConfig):
    pass


class Strategy:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def fingerprint(self):
        return {}

    def load(self):
        import datasets

        ids = self.tokenizer("a stream of text " * 8)["input_ids"][:32]

        def rows():
            while True:
                yield {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids}

        return datasets.IterableDataset.from_generator(rows)


@hookimpl
def dataset_types():
    return {"stream": Stream}


@hookimpl
def dataset_strategy(dataset_cfg, tokenizer):
    return Strategy(tokenizer) if isinstance(dataset_cfg, Stream) else None
"""


def test_streaming_strategy_trains_and_preprocess_refuses(run_host, write_config, local_plugin, tiny_model, tmp_path):
    local_plugin("streamer", _STREAMING_PLUGIN)
    out = tmp_path / "o"
    cfg = base_config(tiny_model("qwen3_moe"), "unused", out, plugins=["streamer"], max_steps=3,
                      dataset_prepared_path=str(tmp_path / "prep"))
    cfg["datasets"] = [{"path": "unused", "type": "stream"}]
    result = run_host("preprocess", write_config(cfg))
    assert result.exit_code == 2 and "nothing for `host preprocess` to prepare" in result.output
    no_steps = {**cfg, "max_steps": None}
    result = run_host("train", write_config(no_steps, "nosteps.yaml"))
    assert result.exit_code == 2 and "streaming dataset has no length; set max_steps" in result.output
    result = run_host("train", write_config(cfg))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run_summary.json").read_text())["steps"] == 3


def test_streaming_refusals_are_reported_together(run_host, write_config, local_plugin, tiny_model, tmp_path):
    local_plugin("streamer", _STREAMING_PLUGIN)
    cfg = base_config(tiny_model("qwen3_moe"), "unused", tmp_path / "o", plugins=["streamer"], max_steps=3,
                      val_set_size=0.1, dataset_exact_deduplication=True)
    cfg["datasets"] = [{"path": "unused", "type": "stream"}]
    result = run_host("train", write_config(cfg))
    assert result.exit_code == 2, result.output
    assert "val_set_size: cannot split an eval set from a streaming dataset" in result.output
    assert "dataset_exact_deduplication: a streaming dataset cannot be deduplicated" in result.output
