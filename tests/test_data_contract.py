"""The dataset-type contract: the host checks and length-limits rows from ANY strategy."""

import json
import sys

import pytest

from host.config import validate
from host.data import prepare
from host.errors import DataError
from host.testing import base_config, write_jsonl

#: A plugin whose rows come from its entry's keys, so each test can break the contract its own way.
_ROWS_PLUGIN = """
from host import hookimpl
from host.config import DatasetConfig


class Rows(DatasetConfig):
    length: int = 200
    breakage: str = "none"
    streaming: bool = False


class Strategy:
    def __init__(self, entry):
        self.entry = entry

    def fingerprint(self):
        return {}

    def load(self):
        import datasets

        n, b = self.entry.length, self.entry.breakage
        rows = []
        for i in range(4):
            ids = [(i + j) % 50 + 10 for j in range(n)]
            row = {"input_ids": ids, "attention_mask": [1] * n, "labels": list(ids)}
            if i == 2 and b == "no_labels":
                del row["labels"]
            if i == 2 and b == "short_labels":
                row["labels"] = ids[:-1]
            if i == 2 and b == "str_labels":
                row["labels"] = [str(t) for t in ids]
            if i == 2 and b == "big_id":
                row["input_ids"] = ids[:-1] + [10**6]
            if i == 2 and b == "bad_label":
                row["labels"] = ids[:-1] + [-5]
            rows.append(row)
        if self.entry.streaming:
            return datasets.IterableDataset.from_generator(lambda: iter(rows))
        if b == "no_labels":
            for r in rows:
                r.pop("labels", None)
        if b == "str_labels":
            for r in rows:
                r["labels"] = [str(t) for t in r["labels"]]
        return datasets.Dataset.from_list(rows)


@hookimpl
def dataset_types():
    return {"rows": Rows}


@hookimpl
def dataset_strategy(dataset_cfg):
    return Strategy(dataset_cfg) if isinstance(dataset_cfg, Rows) else None
"""


@pytest.fixture
def rows_pm(local_plugin, make_plugin_manager):
    local_plugin("rowsplug", _ROWS_PLUGIN)
    sys.modules.pop("host_plugin_rowsplug", None)
    return make_plugin_manager(["rowsplug"])


def _prep(pm, tokenizer, entry, **cfg):
    data = {"base_model": "unused", "plugins": ["rowsplug"], "datasets": [{"path": "unused", "type": "rows", **entry}], **cfg}
    return prepare(validate(data, pm), pm, tokenizer)


def test_plugin_rows_cannot_bypass_sequence_len(rows_pm, tiny_tokenizer, caplog):
    with pytest.raises(DataError, match=r"datasets\[0\] \(unused\): row 0 has 200 tokens, more than sequence_len=32"):
        _prep(rows_pm, tiny_tokenizer, {}, sequence_len=32, excess_length_strategy="raise")
    train, _ = _prep(rows_pm, tiny_tokenizer, {}, sequence_len=32, excess_length_strategy="truncate")
    assert len(train) == 4 and {len(r) for r in train["input_ids"]} == {32} and {len(r) for r in train["labels"]} == {32}
    with pytest.raises(DataError, match="no trainable rows left after dropping 4 row"):
        _prep(rows_pm, tiny_tokenizer, {}, sequence_len=32)


def test_streamed_plugin_rows_get_the_same_policy(rows_pm, tiny_tokenizer):
    train, _ = _prep(rows_pm, tiny_tokenizer, {"streaming": True}, sequence_len=32, excess_length_strategy="truncate")
    assert [len(r["input_ids"]) for r in train] == [32] * 4
    train, _ = _prep(rows_pm, tiny_tokenizer, {"streaming": True}, sequence_len=32, excess_length_strategy="raise")
    with pytest.raises(DataError, match="row 0 has 200 tokens, more than sequence_len=32"):
        next(iter(train))
    train, _ = _prep(rows_pm, tiny_tokenizer, {"streaming": True, "breakage": "short_labels", "length": 8}, sequence_len=32)
    with pytest.raises(DataError, match=r"plugin 'rowsplug'\): row 2: 'labels' has 7 entries but input_ids has 8"):
        list(train)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("no_labels", r"the rows have no \['labels'\] column"),
        ("short_labels", r"row 2: 'labels' has 7 entries but input_ids has 8"),
        ("str_labels", r"row 0: 'labels' must be a list of ints, got list \['10'"),
        ("big_id", r"row 2: input_ids holds 1000000, outside the tokenizer's vocabulary"),
        ("bad_label", r"row 2: labels holds -5: a label is -100 or a token id"),
    ],
)
def test_malformed_plugin_rows_name_plugin_entry_and_row(rows_pm, tiny_tokenizer, breakage, message):
    with pytest.raises(DataError, match=r"datasets\[0\] \(unused\): dataset type 'rows' \(plugin 'rowsplug'\)") as err:
        _prep(rows_pm, tiny_tokenizer, {"breakage": breakage, "length": 8})
    assert err.match(message)


def test_entry_keys_in_validate_output_and_config_hash(run_host, write_config, rows_pm, tmp_path):
    pm = rows_pm
    data = {"base_model": "unused", "plugins": ["rowsplug"], "datasets": [{"path": "x", "type": "rows", "length": 7}]}
    a = validate(data, pm)
    b = validate({**data, "datasets": [{"path": "x", "type": "rows", "length": 9}]}, pm)
    assert a.model_dump()["datasets"][0]["length"] == 7
    assert a.config_hash() != b.config_hash()
    c1 = validate({"base_model": "u", "datasets": [{"path": "x", "type": "completion", "field": "body"}]}, pm)
    c2 = validate({"base_model": "u", "datasets": [{"path": "x", "type": "completion"}]}, pm)
    assert c1.config_hash() != c2.config_hash()
    result = run_host("validate", write_config({"base_model": "u", "datasets": [{"path": "x", "type": "completion", "field": "body"}]}))
    assert result.exit_code == 0 and "field: body" in result.output


_V1 = _ROWS_PLUGIN
_V2 = _ROWS_PLUGIN.replace("(i + j) % 50 + 10", "(i + j) % 50 + 11")


def test_cache_fingerprint_covers_strategy_code(local_plugin, make_plugin_manager, tiny_tokenizer, tmp_path):
    site = local_plugin("rowsplug", _V1)
    sys.modules.pop("host_plugin_rowsplug", None)
    cache = tmp_path / "prep"
    kw = dict(sequence_len=16, excess_length_strategy="truncate", dataset_prepared_path=str(cache))
    first, _ = _prep(make_plugin_manager(["rowsplug"]), tiny_tokenizer, {}, **kw)
    assert len(list(cache.iterdir())) == 1
    (site / "host_plugin_rowsplug.py").write_text(_V2)  # the plugin's code changes, its version does not
    sys.modules.pop("host_plugin_rowsplug", None)
    second, _ = _prep(make_plugin_manager(["rowsplug"]), tiny_tokenizer, {}, **kw)
    assert len(list(cache.iterdir())) == 2
    assert second["input_ids"][0][0] == first["input_ids"][0][0] + 1


def test_data_errors_before_model_weights(run_host, write_config, tiny_model, tmp_path):
    """A missing dataset is reported even though the model's weights are unreadable: data comes first."""
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(tiny_model("qwen3_moe"), broken)
    for f in broken.glob("*.safetensors"):
        f.write_bytes(b"not weights")
    data = write_jsonl(tmp_path / "d.jsonl", [{"body": "no text column"}])
    result = run_host("train", write_config(base_config(broken, data, tmp_path / "o")))
    assert result.exit_code == 2, result.output
    assert "d.jsonl" in result.output and "missing column(s) ['text']" in result.output


def test_stale_temp_dirs_cleaned(make_plugin_manager, tiny_tokenizer, tmp_path):
    """A `host preprocess` killed while saving leaves <digest>.tmp<pid>; the next run removes it."""
    import subprocess

    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "one two three " * 10}])
    cache = tmp_path / "prep"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = cache / f"0123456789abcdef.tmp{dead.pid}"
    (stale / "data").mkdir(parents=True)
    (stale / "data" / "half.arrow").write_bytes(b"x" * 10)
    pm = make_plugin_manager([])
    cfg = validate({"base_model": "u", "sequence_len": 8, "dataset_prepared_path": str(cache),
                    "datasets": [{"path": str(f), "type": "completion"}]}, pm)
    prepare(cfg, pm, tiny_tokenizer)
    names = [p.name for p in cache.iterdir()]
    assert len(names) == 1 and ".tmp" not in names[0]
    assert json.loads((cache / names[0] / "host_prepared.json").read_text())["sequence_len"] == 8


def test_readme_dataset_type_example_works(local_plugin, make_plugin_manager, tiny_tokenizer, tmp_path):
    """The README's 'Writing a dataset type' example, as written, is a working plugin."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Writing a dataset type"):]
    source = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    local_plugin("qa", source)
    sys.modules.pop("host_plugin_qa", None)
    pm = make_plugin_manager(["qa"])
    f = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Name a queue.", "reply": "FIFO."}, {"question": "x", "reply": 3}])
    data = {"base_model": "u", "plugins": ["qa"], "datasets": [{"path": str(f), "type": "qa", "field_answer": "reply"}]}
    with pytest.raises(DataError, match=r"qa\.jsonl.*row 1.*field 'reply' is int"):
        prepare(validate(data, pm), pm, tiny_tokenizer)
    write_jsonl(f, [{"question": "Name a queue.", "reply": "FIFO."}])
    train, _ = prepare(validate(data, pm), pm, tiny_tokenizer)
    row = train[0]
    assert tiny_tokenizer.decode([t for t, l in zip(row["input_ids"], row["labels"]) if l != -100]) == "FIFO.<|endoftext|>"


def test_rows_without_any_label_are_dropped(make_plugin_manager, tiny_tokenizer, tmp_path, caplog):
    """A row whose labels are all -100 teaches nothing (and a batch of them has no loss): dropped, counted."""
    rows = [{"messages": [{"role": "user", "content": "only a question"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "an answer"}]}]
    f = write_jsonl(tmp_path / "c.jsonl", rows)
    pm = make_plugin_manager([])
    cfg = validate({"base_model": "u", "datasets": [{"path": str(f), "type": "chat_template"}]}, pm)
    train, _ = prepare(cfg, pm, tiny_tokenizer)
    assert len(train) == 1 and "dropped 1 row(s) whose labels are all -100" in caplog.text
