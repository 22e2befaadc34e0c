"""Chat templates, message mappings, roles, EOS/EOT training, alpaca and added tokens."""

import copy
import json

import pytest

from host.config import validate
from host.data import prepare
from host.errors import ConfigError, DataError
from host.model import load_tokenizer_and_processor
from host.testing import base_config, write_jsonl

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a queue."},
        {"role": "assistant", "content": "FIFO."},
        {"role": "user", "content": "And a stack?"},
        {"role": "assistant", "content": "LIFO."},
    ]
}


@pytest.fixture
def tok_dir(tiny_tokenizer, tmp_path):
    path = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(str(path))
    return path


def _run(make_plugin_manager, tok_dir, rows, entry=None, **top):
    """Load the tokenizer as a run does (chat_template/tokens applied), then prepare the data."""
    pm = make_plugin_manager([])
    f = write_jsonl(tok_dir.parent / "data.jsonl", rows)
    data = {"base_model": str(tok_dir), "sequence_len": 512,
            "datasets": [{"path": str(f), "type": "chat_template", **(entry or {})}], **top}
    cfg = validate(data, pm)
    tokenizer, _ = load_tokenizer_and_processor(cfg)
    train, _ = prepare(cfg, pm, tokenizer)
    return tokenizer, train


def _learned(tokenizer, row) -> str:
    return tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != -100])


@pytest.mark.parametrize(
    ("template", "eot", "rendered", "learned"),
    [
        ("chatml", "<|im_end|>",
         "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a queue.<|im_end|>\n<|im_start|>assistant\n"
         "FIFO.<|im_end|>\n<|im_start|>user\nAnd a stack?<|im_end|>\n<|im_start|>assistant\nLIFO.<|im_end|>\n",
         "FIFO.<|im_end|>LIFO.<|im_end|>"),
        ("qwen3", "<|im_end|>", None, "FIFO.<|im_end|>LIFO.<|im_end|>"),
        ("llama3", "<|eot_id|>",
         "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
         "Name a queue.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nFIFO.<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nAnd a stack?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
         "LIFO.<|eot_id|>",
         "FIFO.<|eot_id|>LIFO.<|eot_id|>"),
        ("gemma", "<end_of_turn>",
         "<start_of_turn>user\nBe brief.\n\nName a queue.<end_of_turn>\n<start_of_turn>model\nFIFO.<end_of_turn>\n"
         "<start_of_turn>user\nAnd a stack?<end_of_turn>\n<start_of_turn>model\nLIFO.<end_of_turn>\n",
         "FIFO.<end_of_turn>LIFO.<end_of_turn>"),
    ],
)
def test_named_templates(make_plugin_manager, tok_dir, template, eot, rendered, learned):
    markers = ["<|im_start|>", "<|start_header_id|>", "<|end_header_id|>", "<start_of_turn>"]
    tokenizer, train = _run(make_plugin_manager, tok_dir, [CHAT], chat_template=template, eot_tokens=[eot], tokens=markers)
    text = tokenizer.decode(train[0]["input_ids"])
    if rendered is not None:
        assert text == rendered
    assert _learned(tokenizer, train[0]) == learned
    assert "Name a queue" not in _learned(tokenizer, train[0])
    assert eot in tokenizer.get_vocab() and tokenizer.convert_tokens_to_ids(eot) in train[0]["input_ids"]


def test_qwen3_reasoning_content_is_learned(make_plugin_manager, tok_dir):
    row = {"messages": [{"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "4", "thinking": "add them"}]}
    tokenizer, train = _run(make_plugin_manager, tok_dir, [row], chat_template="qwen3", eot_tokens=["<|im_end|>"],
                            entry={"message_property_mappings": {"reasoning_content": "thinking"}})
    assert _learned(tokenizer, train[0]) == "<think>\nadd them\n</think>\n\n4<|im_end|>"


@pytest.mark.parametrize(
    ("policy", "learned"),
    [("turn", "FIFO.<|im_end|>LIFO.<|im_end|>"), ("none", "FIFO.LIFO."), ("last", "FIFO.LIFO.<|im_end|>"),
     ("all", "<|im_end|><|im_end|>FIFO.<|im_end|><|im_end|>LIFO.<|im_end|>")],
)
def test_train_on_eos(make_plugin_manager, tok_dir, policy, learned):
    tokenizer, train = _run(make_plugin_manager, tok_dir, [CHAT], entry={"train_on_eos": policy},
                            chat_template="chatml", eot_tokens=["<|im_end|>"])
    assert _learned(tokenizer, train[0]) == learned


def test_eos_is_the_default_marker(make_plugin_manager, tok_dir):
    """Without eot_tokens the tokenizer's eos_token marks the end of a turn (axolotl's default)."""
    tokenizer, train = _run(make_plugin_manager, tok_dir, [CHAT], entry={"train_on_eos": "none"},
                            chat_template="chatml", special_tokens={"eos_token": "<|im_end|>"})
    assert tokenizer.eos_token == "<|im_end|>"
    assert _learned(tokenizer, train[0]) == "FIFO.LIFO."


def test_roles_to_train_and_train_on_inputs(make_plugin_manager, tok_dir):
    tokenizer, train = _run(make_plugin_manager, tok_dir, [CHAT], entry={"roles_to_train": ["user", "assistant"]})
    assert _learned(tokenizer, train[0]) == "Name a queue.<|end|>FIFO.<|end|>And a stack?<|end|>LIFO.<|end|>"
    tokenizer, train = _run(make_plugin_manager, tok_dir, [CHAT], train_on_inputs=True)
    assert train[0]["labels"] == train[0]["input_ids"]


def test_sharegpt_shape_through_mappings(make_plugin_manager, tok_dir):
    share = {"conversations": [{"from": "human", "value": "Name a queue."}, {"from": "gpt", "value": "FIFO."}]}
    plain = {"messages": [{"role": "user", "content": "Name a queue."}, {"role": "assistant", "content": "FIFO."}]}
    _, a = _run(make_plugin_manager, tok_dir, [share],
                entry={"field_messages": "conversations", "message_property_mappings": {"role": "from", "content": "value"}})
    _, b = _run(make_plugin_manager, tok_dir, [plain])
    assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
    # the deprecated spellings mean the same
    _, c = _run(make_plugin_manager, tok_dir, [share],
                entry={"field_messages": "conversations", "message_field_role": "from", "message_field_content": "value"})
    assert c["labels"] == b["labels"]


def test_roles_remap(make_plugin_manager, tok_dir):
    row = {"messages": [{"role": "asker", "content": "Name a queue."}, {"role": "bot", "content": "FIFO."}]}
    tokenizer, train = _run(make_plugin_manager, tok_dir, [row], entry={"roles": {"user": ["asker"], "assistant": ["bot"]}})
    assert _learned(tokenizer, train[0]) == "FIFO.<|end|>"
    assert "<|user|>Name a queue." in tokenizer.decode(train[0]["input_ids"])


def test_jinja_template_text_and_file(make_plugin_manager, tok_dir, tmp_path):
    jinja = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}<|end|>{% endfor %}"
             "{% if add_generation_prompt %}[assistant]{% endif %}")
    tokenizer, train = _run(make_plugin_manager, tok_dir, [CHAT], chat_template="jinja", chat_template_jinja=jinja)
    assert tokenizer.decode(train[0]["input_ids"]).startswith("[system]Be brief.<|end|>[user]")
    assert _learned(tokenizer, train[0]) == "FIFO.<|end|>LIFO.<|end|>"
    (tmp_path / "t.jinja").write_text(jinja)
    tokenizer, again = _run(make_plugin_manager, tok_dir, [CHAT], chat_template_jinja=str(tmp_path / "t.jinja"))
    assert again["input_ids"] == train["input_ids"]


def test_bad_template_keys(make_plugin_manager, tok_dir):
    pm = make_plugin_manager([])
    with pytest.raises(ConfigError, match="unknown chat template 'chatmlx'"):
        validate({"base_model": "u", "chat_template": "chatmlx"}, pm)
    with pytest.raises(ConfigError, match="chat_template: jinja needs chat_template_jinja"):
        validate({"base_model": str(tok_dir), "chat_template": "jinja"}, pm)
    with pytest.raises(ConfigError, match="chat_template_jinja: 'no/such.jinja' is neither"):
        validate({"base_model": str(tok_dir), "chat_template_jinja": "no/such.jinja"}, pm)
    entry = {"path": "org/data", "type": "chat_template", "roles_to_train": ["asistant"]}
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.roles_to_train: \['asistant'\] name no role"):
        validate({"base_model": str(tok_dir), "datasets": [entry]}, pm)


def test_no_template_at_all(make_plugin_manager, tiny_tokenizer, tmp_path):
    bare = copy.deepcopy(tiny_tokenizer)
    bare.chat_template = None
    bare.save_pretrained(str(tmp_path / "tok"))
    with pytest.raises(DataError, match="the tokenizer has no chat_template; set chat_template"):
        _run(make_plugin_manager, tmp_path / "tok", [CHAT])
    tokenizer, train = _run(make_plugin_manager, tmp_path / "tok", [CHAT], chat_template="tokenizer_default_fallback_chatml")
    assert tokenizer.decode(train[0]["input_ids"]).startswith("<|im_start|>system")


def test_alpaca(make_plugin_manager, tiny_tokenizer, tmp_path):
    rows = [{"instruction": "Name a queue.", "input": "", "output": "FIFO."},
            {"instruction": "Translate.", "input": "stack", "output": "LIFO."}]
    f = write_jsonl(tmp_path / "a.jsonl", rows)
    pm = make_plugin_manager([])
    for on_inputs in (False, True):
        cfg = validate({"base_model": "u", "train_on_inputs": on_inputs, "datasets": [{"path": str(f), "type": "alpaca"}]}, pm)
        train, _ = prepare(cfg, pm, tiny_tokenizer)
        text = tiny_tokenizer.decode(train[1]["input_ids"])
        assert "### Instruction:\nTranslate.\n\n### Input:\nstack\n\n### Response:\nLIFO.<|endoftext|>" in text
        assert "### Input" not in tiny_tokenizer.decode(train[0]["input_ids"])
        if on_inputs:
            assert train[1]["labels"] == train[1]["input_ids"]
        else:
            assert _learned(tiny_tokenizer, train[1]) == "LIFO.<|endoftext|>"


def test_added_tokens_train_with_lora_and_merge(run_host, write_config, tiny_model, tmp_path):
    """New tokens: embeddings grow, LoRA trains and saves exactly their rows, merge-lora works."""
    from safetensors.torch import load_file

    rows = [CHAT] * 16
    f = write_jsonl(tmp_path / "c.jsonl", rows)
    out = tmp_path / "o"
    cfg = base_config(tiny_model("qwen3_moe"), f, out, sequence_len=128, max_steps=3, chat_template="chatml",
                      eot_tokens=["<|im_end|>"], tokens=["<|im_start|>"], special_tokens={"pad_token": "<|pad|>"})
    cfg["datasets"] = [{"path": str(f), "type": "chat_template"}]
    result = run_host("train", write_config(cfg))
    assert result.exit_code == 0, result.output
    saved = load_file(str(out / "adapter_model.safetensors"))
    token_keys = [k for k in saved if "trainable_tokens" in k]
    assert any("embed_tokens" in k for k in token_keys) and any("lm_head" in k for k in token_keys), sorted(saved)
    assert all(v.shape[0] == 2 for k, v in saved.items() if k in token_keys)  # two new tokens, nothing more
    assert not [k for k in saved if "base_layer" in k or k.endswith("embed_tokens.weight")], sorted(saved)
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in (out / "tokenizer.json").read_text() and "chat_template" in str(tok_cfg) + str(list(out.iterdir()))
    result = run_host("merge-lora", write_config(cfg))
    assert result.exit_code == 0, result.output
    merged = json.loads((out / "merged" / "config.json").read_text())
    assert merged.get("vocab_size", merged.get("text_config", {}).get("vocab_size")) >= 514


def test_axolotl_thinking_keys_passthrough_and_drop_system(make_plugin_manager, tok_dir):
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "4", "thought": "add them"}]}
    kw = dict(chat_template="qwen3", eot_tokens=["<|im_end|>"])
    tokenizer, a = _run(make_plugin_manager, tok_dir, [row], entry={"field_thinking": "thought"}, **kw)
    assert _learned(tokenizer, a[0]) == "<think>\nadd them\n</think>\n\n4<|im_end|>"
    # an unmapped key reaches the template under its own name (here the one qwen3 reads)
    same = {"messages": [*row["messages"][:2], {"role": "assistant", "content": "4", "reasoning_content": "add them"}]}
    _, b = _run(make_plugin_manager, tok_dir, [same], **kw)
    assert b["input_ids"] == a["input_ids"]
    _, c = _run(make_plugin_manager, tok_dir, [same], entry={"drop_system_message": True, "type": "chat_template.default"}, **kw)
    assert "Be brief" not in tokenizer.decode(c[0]["input_ids"]) and "Be brief" in tokenizer.decode(b[0]["input_ids"])


@pytest.mark.parametrize("tied", [True, False])
def test_added_token_rows_train_tied_or_not(make_plugin_manager, tiny_tokenizer, tied):
    """LoRA + new tokens: only the new rows (and LoRA) get gradients, whether lm_head is tied or not."""
    import torch
    from transformers import AutoModelForCausalLM

    from host.model import attach_adapter
    from host.testing import tiny_config
    from host.tokens import apply_to_tokenizer, fit_embeddings

    pm = make_plugin_manager([])
    cfg = validate({"base_model": "u", "adapter": "lora", "lora_target_modules": ["q_proj"], "tokens": ["<|a|>", "<|b|>"]}, pm)
    tok = copy.deepcopy(tiny_tokenizer)
    assert sorted(apply_to_tokenizer(cfg, tok)) == ["<|a|>", "<|b|>"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3", len(tiny_tokenizer), tie_word_embeddings=tied))
    fit_embeddings(model, tok)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    model = attach_adapter(cfg, model, tok)
    ids = torch.tensor([tok.convert_tokens_to_ids(["<|a|>", "<|b|>"]) + [5, 6]])
    model(input_ids=ids, labels=ids).loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    deltas = [n for n in trainable if "trainable_tokens_delta" in n]
    assert len(deltas) == (1 if tied else 2), deltas
    assert all(trainable[n].shape[0] == 2 and trainable[n].grad.abs().sum() > 0 for n in deltas)
    assert all("lora_" in n or "trainable_tokens" in n for n in trainable)


def test_model_family_template_names_use_the_tokenizers_own(make_plugin_manager, tok_dir, tiny_tokenizer, tmp_path, caplog):
    """axolotl's names for a family's own template (qwen3_5, gemma4, ...) validate with one warning and render
    with the tokenizer's template; without one, the data step names chat_template. Other unknown names stay errors."""
    with caplog.at_level("WARNING", logger="host.data"):
        tokenizer, train = _run(make_plugin_manager, tok_dir, [CHAT], chat_template="qwen3_5")
    assert "'qwen3_5' is that model family's own template" in caplog.text
    _, default = _run(make_plugin_manager, tok_dir, [CHAT], chat_template="tokenizer_default")
    assert train["input_ids"] == default["input_ids"] and train["labels"] == default["labels"]
    bare = copy.deepcopy(tiny_tokenizer)
    bare.chat_template = None
    bare.save_pretrained(str(tmp_path / "bare"))
    with pytest.raises(DataError, match="the tokenizer has no chat_template; set chat_template"):
        _run(make_plugin_manager, tmp_path / "bare", [CHAT], chat_template="gemma4")
    with pytest.raises(ConfigError, match="unknown chat template 'metharme'"):
        validate({"base_model": "u", "chat_template": "metharme"}, make_plugin_manager([]))
