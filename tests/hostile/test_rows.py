"""Hostile data rows for the built-in dataset types: every one is a DataError naming the file,
the row (counted from 0) and the field, raised before anything is tokenized; nothing hangs."""

import os
import signal

import pytest

from host.config import validate
from host.data import prepare
from host.errors import DataError
from host.testing import base_config, write_jsonl


@pytest.fixture(autouse=True)
def _no_hang():
    """A row that makes the host block (a FIFO, /dev/zero) fails the test instead of hanging CI."""

    def boom(*_):
        raise TimeoutError("the host hung on a hostile input")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _prep(make_plugin_manager, tokenizer, path, kind="completion", **entry):
    pm = make_plugin_manager([])
    cfg = validate({"base_model": "u", "sequence_len": 64, "datasets": [{"path": str(path), "type": kind, **entry}]}, pm)
    return prepare(cfg, pm, tokenizer)


def _parquet(path, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


GOOD = "A sentence of plain text that tokenizes."


# --- completion ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("value", "says"),
    [(7, "is an int"), ({"a": "b"}, "is a mapping"), (True, "is a bool"), (["a", "b"], "is a list of strings"), (None, "is null")],
)
def test_completion_text_of_wrong_type_in_one_row(make_plugin_manager, tiny_tokenizer, tmp_path, value, says):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": GOOD}, {"text": GOOD}, {"text": value}, {"text": GOOD}])
    with pytest.raises(DataError, match=rf"t\.jsonl.*row 2.*field 'text' {says}"):
        _prep(make_plugin_manager, tiny_tokenizer, f)


@pytest.mark.parametrize(("value", "says"), [(7, "is an int"), ({"a": "b"}, "is a mapping"), (False, "is a bool"), (["a"], "is a list")])
def test_completion_text_of_wrong_type_in_all_rows(make_plugin_manager, tiny_tokenizer, tmp_path, value, says):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": value}] * 3)
    with pytest.raises(DataError, match=rf"t\.jsonl.*row 0.*field 'text' {says}"):
        _prep(make_plugin_manager, tiny_tokenizer, f)


@pytest.mark.parametrize(
    ("column", "says"),
    [([1, 2, 3], "is an int"), ([{"a": "x"}] * 3, "is a mapping"), ([["a", "b"]] * 3, "is a list of strings"),
     ([GOOD, None, GOOD], "is null")],
)
def test_completion_parquet_column_of_wrong_type(make_plugin_manager, tiny_tokenizer, tmp_path, column, says):
    f = _parquet(tmp_path / "t.parquet", {"text": column})
    row = 1 if None in column else 0
    with pytest.raises(DataError, match=rf"t\.parquet: row {row}: field 'text' {says}"):
        _prep(make_plugin_manager, tiny_tokenizer, f)


def test_non_utf8_jsonl(make_plugin_manager, tiny_tokenizer, tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9 latin-1"}\n')
    with pytest.raises(DataError, match=r"t\.jsonl: row 1 \(line 2\): bytes at column \d+ are not UTF-8"):
        _prep(make_plugin_manager, tiny_tokenizer, f)


def test_invalid_json_line(make_plugin_manager, tiny_tokenizer, tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"text": "fine"}\n{"text": "unterminated}\n')
    with pytest.raises(DataError, match=r"t\.jsonl: row 1 \(line 2\): not valid JSON"):
        _prep(make_plugin_manager, tiny_tokenizer, f)


# --- chat_template ----------------------------------------------------------------------------

OK_CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize(
    ("messages", "says"),
    [
        ([], "is an empty list"),
        ("user: hi", "is str, expected a list of messages"),
        ({"role": "user", "content": "hi"}, "is a mapping, expected a list of messages"),
        (None, "is null, expected a list of messages"),
        ([{"role": None, "content": "x"}], "message 0: has no 'role'"),
        ([{"role": 3, "content": "x"}], "message 0: 'role' is an int, expected a role name"),
        ([{"role": "user", "content": "x"}, {"role": "wizard", "content": "y"}], "message 1: unknown role 'wizard'"),
        ([{"role": "user", "content": None}], "message 0: 'content' is null or missing"),
        ([{"role": "user"}], "message 0: 'content' is null or missing"),
        ([{"content": "x"}], "message 0: has no 'role'"),
        (["just text"], "message 0: is str, expected a mapping"),
        ([{"role": "user", "content": [{"type": "image", "url": "a.png"}]}], "part of type 'image'"),
        ([{"role": "user", "content": 5}], "'content' is an int"),
    ],
)
def test_chat_rows(make_plugin_manager, tiny_tokenizer, tmp_path, messages, says):
    f = write_jsonl(tmp_path / "c.jsonl", [OK_CHAT, {"messages": messages}])
    with pytest.raises(DataError) as err:
        _prep(make_plugin_manager, tiny_tokenizer, f, "chat_template")
    msg = str(err.value)
    assert "c.jsonl" in msg and "row 1" in msg and "field 'messages'" in msg and says in msg, msg
    assert "string indices must be integers" not in msg


def test_chat_rows_all_bad_in_parquet(make_plugin_manager, tiny_tokenizer, tmp_path):
    f = _parquet(tmp_path / "c.parquet", {"messages": [[{"role": "wizard", "content": "x"}]] * 2})
    with pytest.raises(DataError, match=r"c\.parquet: row 0: field 'messages' message 0: unknown role 'wizard'"):
        _prep(make_plugin_manager, tiny_tokenizer, f, "chat_template")


def test_chat_text_parts_are_joined(make_plugin_manager, tiny_tokenizer, tmp_path):
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "hello"}]}]}
    plain = {"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]}
    a, _ = _prep(make_plugin_manager, tiny_tokenizer, write_jsonl(tmp_path / "a.jsonl", [parts]), "chat_template")
    b, _ = _prep(make_plugin_manager, tiny_tokenizer, write_jsonl(tmp_path / "b.jsonl", [plain]), "chat_template")
    assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]


# --- alpaca -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("row", "says"),
    [({"instruction": 3, "output": "x"}, "field 'instruction' is an int"),
     ({"instruction": "x", "input": ["a"], "output": "y"}, "field 'input' is a list of strings"),
     ({"instruction": "x", "output": None}, "field 'output' is null")],
)
def test_alpaca_rows(make_plugin_manager, tiny_tokenizer, tmp_path, row, says):
    good = {"instruction": "Say hi.", "input": "", "output": "Hi."}
    f = write_jsonl(tmp_path / "a.jsonl", [good, row])
    with pytest.raises(DataError, match=rf"a\.jsonl.*row 1.*{says}"):
        _prep(make_plugin_manager, tiny_tokenizer, f, "alpaca")


# --- paths ------------------------------------------------------------------------------------

def test_model_directory_as_dataset(make_plugin_manager, tiny_tokenizer, tiny_model):
    model_dir = tiny_model("qwen3_moe")
    with pytest.raises(DataError, match=r"looks like a model directory \(config\.json"):
        _prep(make_plugin_manager, tiny_tokenizer, model_dir)


def test_fifo_is_refused_not_read(make_plugin_manager, tiny_tokenizer, tmp_path):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match=r"pipe\.jsonl is a FIFO \(named pipe\), not a regular file"):
        _prep(make_plugin_manager, tiny_tokenizer, fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"text": GOOD}])
    os.mkfifo(folder / "b.jsonl")
    with pytest.raises(DataError, match=r"b\.jsonl is a FIFO"):
        _prep(make_plugin_manager, tiny_tokenizer, folder)


def test_character_device_is_refused(make_plugin_manager, tiny_tokenizer):
    with pytest.raises(DataError, match=r"/dev/zero is a character device, not a regular file"):
        _prep(make_plugin_manager, tiny_tokenizer, "/dev/zero")


def test_cli_exit_2_names_file_row_and_field(run_host, write_config, tiny_model, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": GOOD}, {"text": {"nested": 1}}])
    cfg = base_config(tiny_model("qwen3_moe"), f, tmp_path / "o", dataset_prepared_path=str(tmp_path / "p"))
    result = run_host("preprocess", write_config(cfg))
    assert result.exit_code == 2
    assert "d.jsonl" in result.output and "row 1" in result.output and "field 'text' is a mapping" in result.output
    assert "Traceback" not in result.output
