"""The host's built-in plugin: the ``completion``, ``chat_template`` and ``alpaca`` dataset types
and the top-level keys that shape their text (``chat_template``, added tokens, ``train_on_inputs``).

Implemented through the same hooks as any external plugin (as pytest does with its own
features), so the host has a single data path: these strategies only turn raw rows into
``input_ids``/``labels``; the host checks the rows and applies the length policy.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import Field, field_validator

from host import chat_templates, hookimpl
from host.config import DatasetConfig, StrictModel
from host.data import load_raw
from host.errors import DataError

log = logging.getLogger("host.data")


# --- config ----------------------------------------------------------------------------------


class SpecialTokens(StrictModel):
    """``special_tokens:``: set (and add when missing) the tokenizer's special tokens."""

    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    additional_special_tokens: list[str] | None = None


class TextKeys(StrictModel):
    """Top-level keys of the built-in dataset types (axolotl's names and meanings)."""

    chat_template: str | None = Field(
        None, description="tokenizer_default, chatml, llama3, qwen3, gemma, jinja, or tokenizer_default_fallback_<name>."
    )
    chat_template_jinja: str | None = Field(None, description="Jinja template text or a path to one (chat_template: jinja).")
    special_tokens: SpecialTokens | None = None
    eot_tokens: list[str] | None = Field(None, description="End-of-turn markers; default: the eos_token.")
    tokens: list[str] | None = Field(None, description="Extra (non-special) tokens added to the tokenizer.")
    train_on_inputs: bool = Field(False, description="Take the loss on prompts too, not only on responses.")

    @field_validator("chat_template")
    @classmethod
    def _template(cls, value):
        return chat_templates.check_name(value)


class CompletionDataset(DatasetConfig):
    """Continued pretraining on raw text: documents are joined with EOS and cut into
    ``sequence_len`` blocks, so no row is ever too long and no token is padding."""

    field: str = "text"


#: axolotl's default ``roles``: target role -> the names data may use for it.
DEFAULT_ROLES = {"user": ["user", "human"], "assistant": ["assistant", "gpt", "model"], "system": ["system"], "tool": ["tool"]}


class ChatTemplateDataset(DatasetConfig):
    """Conversations rendered with the chat template; loss on ``roles_to_train`` turns."""

    field_messages: str = "messages"
    message_property_mappings: dict[str, str] | None = Field(
        None, description="{template property: key in the data}, e.g. {role: from, content: value}."
    )
    message_field_role: str | None = Field(None, description="Deprecated axolotl spelling of message_property_mappings.role.")
    message_field_content: str | None = Field(None, description="Deprecated spelling of message_property_mappings.content.")
    roles: dict[str, list[str]] | None = Field(
        None, description="{target role: [names in the data]}; merged over the default user/assistant/system/tool."
    )
    field_thinking: str | None = Field(None, description="Message key holding the reasoning trace.")
    template_thinking_key: str = Field("reasoning_content", description="The name the template expects it under.")
    drop_system_message: bool = False
    roles_to_train: list[str] = ["assistant"]
    train_on_eos: Literal["all", "turn", "last", "none"] = "turn"
    train_on_eot: Literal["all", "turn", "last", "none"] | None = None

    def mappings(self) -> dict[str, str]:
        out = {"role": self.message_field_role or "role", "content": self.message_field_content or "content"}
        if self.field_thinking:
            out[self.template_thinking_key] = self.field_thinking
        return {**out, **(self.message_property_mappings or {})}

    def role_names(self) -> dict[str, str]:
        """{name in the data: target role}."""
        table = {**DEFAULT_ROLES, **(self.roles or {})}
        return {src: target for target, sources in table.items() for src in sources}


class AlpacaDataset(DatasetConfig):
    """Instruction / input / output rows in the Alpaca prompt format; loss on the output."""

    field_instruction: str = "instruction"
    field_input: str = "input"
    field_output: str = "output"


@hookimpl
def config_model():
    return TextKeys


@hookimpl
def validate_config(cfg):
    """What can be known about the text keys without a tokenizer: a template that cannot be found,
    roles_to_train naming no role (a typo would otherwise train on nothing)."""
    from pathlib import Path

    from host.errors import ConfigError

    if cfg.chat_template == "jinja" and not cfg.chat_template_jinja:
        raise ConfigError("chat_template: jinja needs chat_template_jinja (the template text or a path to a .jinja file).")
    src = cfg.chat_template_jinja
    if src and "{" not in src and "\n" not in src and not Path(src).expanduser().is_file():
        raise ConfigError(f"chat_template_jinja: {src!r} is neither Jinja template text nor an existing template file.")
    for i, entry in enumerate(cfg.datasets):
        if isinstance(entry, ChatTemplateDataset):
            names = entry.role_names()
            known = set(names) | set(names.values())
            unknown = [r for r in entry.roles_to_train if r not in known]
            if unknown:
                raise ConfigError(f"datasets[{i}].roles_to_train: {unknown} name no role; known roles: "
                                  f"{', '.join(sorted(known))} (add others with the entry's roles key).")
    return None


@hookimpl
def dataset_types():
    # chat_template.default: axolotl's spelling of the same type
    return {"completion": CompletionDataset, "chat_template": ChatTemplateDataset,
            "chat_template.default": ChatTemplateDataset, "alpaca": AlpacaDataset}


@hookimpl
def dataset_strategy(cfg, dataset_cfg, tokenizer):
    for model, strategy in ((CompletionDataset, CompletionStrategy), (ChatTemplateDataset, ChatTemplateStrategy),
                            (AlpacaDataset, AlpacaStrategy)):
        if type(dataset_cfg) is model:
            return strategy(cfg, dataset_cfg, tokenizer)
    return None


def _where(cfg, entry) -> str:
    return f"datasets[{cfg.datasets.index(entry)}] ({entry.path})"


# --- row schemas: checked by load_raw before anything is tokenized ----------------------------------


def _kind(value) -> str:
    names = {bool: "a bool", int: "an int", float: "a float", dict: "a mapping", list: "a list", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def text_value(value) -> str | None:
    """Problem with a text field, or None when it is a string."""
    if isinstance(value, str):
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "is a list of strings, expected one string; join the parts into one text"
    return f"is {_kind(value)}, expected a string"


# --- completion ------------------------------------------------------------------------------


class CompletionStrategy:
    def __init__(self, cfg, entry: CompletionDataset, tokenizer):
        self.cfg, self.entry, self.tokenizer = cfg, entry, tokenizer

    def fingerprint(self) -> dict[str, Any]:
        return {"version": 2, "documents": self.cfg.sample_packing}

    def load(self):
        where = _where(self.cfg, self.entry)
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise DataError(f"{where}: the tokenizer has no eos_token; completion data needs one between documents.")
        raw = load_raw(self.entry, where, schema={self.entry.field: text_value})
        if self.cfg.sample_packing:
            return self._documents(raw, where)
        field, seq, tokenizer = self.entry.field, self.cfg.sequence_len, self.tokenizer

        # closes over plain values only, so `datasets` can fingerprint (pickle) it
        def chunk(batch):
            ids = []
            for text in batch[field]:
                if text:
                    ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + [eos])
            n = max(len(ids) // seq, 1 if ids else 0)
            blocks = [ids[i * seq : (i + 1) * seq] for i in range(n)]
            return {"input_ids": blocks, "attention_mask": [[1] * len(b) for b in blocks], "labels": blocks}

        out = raw.map(chunk, batched=True, batch_size=1000, remove_columns=raw.column_names, desc="tokenize")
        if len(out) == 0:
            raise DataError(f"{where}: no text in column {field!r}; the dataset is empty.")
        return out

    def _documents(self, raw, where: str):
        """Under sample_packing: one row per document (+ EOS), a longer one split into
        ``sequence_len`` pieces; the packer keeps the rows apart and nothing is dropped."""
        field, seq, tokenizer, eos = self.entry.field, self.cfg.sequence_len, self.tokenizer, self.tokenizer.eos_token_id

        def split(batch):
            pieces = []
            for text in batch[field]:
                if text:
                    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
                    pieces.extend(ids[i : i + seq] for i in range(0, len(ids), seq))
            return {"input_ids": pieces, "attention_mask": [[1] * len(p) for p in pieces], "labels": pieces}

        out = raw.map(split, batched=True, batch_size=1000, remove_columns=raw.column_names, desc="tokenize documents")
        if len(out) == 0:
            raise DataError(f"{where}: no text in column {field!r}; the dataset is empty.")
        return out


# --- alpaca ----------------------------------------------------------------------------------

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def _optional_text(value) -> str | None:
    return None if value is None else text_value(value)


class AlpacaStrategy:
    def __init__(self, cfg, entry: AlpacaDataset, tokenizer):
        self.cfg, self.entry, self.tokenizer = cfg, entry, tokenizer

    def fingerprint(self) -> dict[str, Any]:
        return {"version": 1, "train_on_inputs": self.cfg.train_on_inputs}

    def load(self):
        where = _where(self.cfg, self.entry)
        e = self.entry
        if self.tokenizer.eos_token_id is None:
            raise DataError(f"{where}: the tokenizer has no eos_token; alpaca responses end with one.")
        schema = {e.field_instruction: text_value, e.field_output: text_value}
        raw = load_raw(self.entry, where, schema=schema, optional={e.field_input: _optional_text})
        return raw.map(
            encode_alpaca,
            fn_kwargs={"entry": e, "tokenizer": self.tokenizer, "train_on_inputs": self.cfg.train_on_inputs},
            remove_columns=raw.column_names,
            desc="alpaca",
        )


def encode_alpaca(row, entry: AlpacaDataset, tokenizer, train_on_inputs: bool) -> dict[str, list[int]]:
    """Prompt and response are tokenized apart and joined, so the boundary is exact."""
    extra = row.get(entry.field_input) or ""
    template = PROMPT_WITH_INPUT if extra.strip() else PROMPT_NO_INPUT
    prompt = tokenizer(template.format(instruction=row[entry.field_instruction], input=extra))["input_ids"]
    response = tokenizer(row[entry.field_output], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = list(prompt) + response
    labels = ids if train_on_inputs else [-100] * len(prompt) + response
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(labels)}


# --- chat_template ----------------------------------------------------------------------------


class Conversation:
    """A ``chat_template`` entry's message schema: checks raw rows and normalises messages."""

    def __init__(self, entry: ChatTemplateDataset):
        self.map = entry.mappings()
        self.names = entry.role_names()
        self.field = entry.field_messages
        self.drop_system = entry.drop_system_message

    def problem(self, value) -> str | None:
        """Schema check of one row's messages value (None when usable)."""
        if not isinstance(value, list):
            return f"is {_kind(value)}, expected a list of messages ({{{self.map['role']!r}: ..., {self.map['content']!r}: ...}})"
        if not value:
            return "is an empty list; a conversation needs at least one message"
        for j, m in enumerate(value):
            try:
                self.message(m)
            except ValueError as exc:
                return f"message {j}: {exc}"
        return None

    def message(self, m) -> dict[str, Any]:
        """One normalised message (target role, text content, other mapped properties)."""
        rk, ck = self.map["role"], self.map["content"]
        if not isinstance(m, dict):
            raise ValueError(f"is {_kind(m)}, expected a mapping with keys {rk!r} and {ck!r}")
        if rk not in m or m[rk] is None:
            raise ValueError(f"has no {rk!r} (its keys: {sorted(k for k, v in m.items() if v is not None)}); "
                             f"set message_property_mappings.role to the key holding the role")
        role = m[rk]
        if not isinstance(role, str):
            raise ValueError(f"{rk!r} is {_kind(role)}, expected a role name")
        if role not in self.names:
            raise ValueError(f"unknown role {role!r}; known: {', '.join(sorted(self.names))}. Map it with the entry's "
                             f"roles key, e.g. roles: {{assistant: [{role}]}}")
        # keys the mappings do not name pass through under their own name (axolotl's rule)
        out = {k: v for k, v in m.items() if v is not None and k not in self.map.values()}
        out.update(role=self.names[role], content=self.content(m.get(ck), ck))
        for prop, key in self.map.items():
            if prop not in ("role", "content") and m.get(key) is not None:
                out[prop] = m[key]
        return out

    @staticmethod
    def content(value, key: str) -> str:
        if isinstance(value, str):
            return value
        if value is None:
            raise ValueError(f"{key!r} is null or missing; give every message text (an empty string is allowed)")
        if isinstance(value, list):
            texts = []
            for part in value:
                if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                else:
                    kind = part.get("type") if isinstance(part, dict) else _kind(part)
                    raise ValueError(f"{key!r} holds a part of type {kind!r}; chat_template takes text parts only "
                                     f"({{type: text, text: ...}}); images need a multimodal dataset type")
            return "".join(texts)
        raise ValueError(f"{key!r} is {_kind(value)}, expected a string or a list of text parts")


class ChatTemplateStrategy:
    def __init__(self, cfg, entry: ChatTemplateDataset, tokenizer):
        self.cfg, self.entry, self.tokenizer = cfg, entry, tokenizer

    def fingerprint(self) -> dict[str, Any]:
        return {"version": 2, "train_on_inputs": self.cfg.train_on_inputs, "eot_tokens": self.cfg.eot_tokens}

    def load(self):
        where = _where(self.cfg, self.entry)
        if not getattr(self.tokenizer, "chat_template", None):
            raise DataError(
                f"{where}: the tokenizer has no chat_template; set chat_template (chatml, llama3, qwen3, gemma, or "
                f"jinja with chat_template_jinja) or use a tokenizer that has one."
            )
        if not getattr(self.tokenizer, "is_fast", False):
            raise DataError(f"{where}: chat_template needs a fast tokenizer (character offsets locate each turn).")
        conv = Conversation(self.entry)
        raw = load_raw(self.entry, where, schema={self.entry.field_messages: conv.problem})
        spec = LabelSpec.build(self.cfg, self.entry, self.tokenizer)
        return raw.map(
            tokenize_conversation,
            with_indices=True,
            fn_kwargs={"conv": conv, "spec": spec, "tokenizer": self.tokenizer, "where": where},
            remove_columns=raw.column_names,
            desc="chat template",
        )


class LabelSpec:
    """Which characters of a rendered conversation carry the loss."""

    def __init__(self, roles_to_train, markers, train_on_inputs):
        self.roles_to_train, self.markers, self.train_on_inputs = set(roles_to_train), markers, train_on_inputs

    @classmethod
    def build(cls, cfg, entry: ChatTemplateDataset, tokenizer) -> LabelSpec:
        names = entry.role_names()
        roles = {names.get(r, r) for r in entry.roles_to_train}
        eos = tokenizer.eos_token
        eot_policy = entry.train_on_eot or entry.train_on_eos
        markers = [(t, entry.train_on_eos if t == eos else eot_policy) for t in (cfg.eot_tokens or ([eos] if eos else []))]
        return cls(sorted(roles), markers, cfg.train_on_inputs)


def tokenize_conversation(row, index: int, conv: Conversation, spec: LabelSpec, tokenizer, where: str) -> dict[str, list[int]]:
    """Label the characters of trained turns, then the tokens that start in them.

    Turn ``i`` spans the characters the template adds when message ``i`` is appended; an assistant
    turn's content starts after the generation prompt, other roles' where their text appears. The
    first end-of-turn marker after the content ends the labelled part (``train_on_eos`` decides
    the marker itself). This needs only that the template renders a prefix as a prefix.
    """
    messages = [conv.message(m) for m in row[conv.field]]
    if conv.drop_system:
        messages = [m for m in messages if m["role"] != "system"]
    full = _render(tokenizer, messages, False, where, index)
    spans: list[tuple[int, int]] = []
    markers: list[tuple[int, int, str, bool]] = []  # start, end, policy, turn trained
    before = _render(tokenizer, [], False, where, index) if messages else ""
    for i, m in enumerate(messages):
        after = _render(tokenizer, messages[: i + 1], False, where, index)
        if not (full.startswith(after) and after.startswith(before)):
            raise DataError(
                f"{where}: row {index}: the chat template does not render a conversation's prefix as a prefix of "
                f"the whole, so turns cannot be located; use chat_template: chatml/llama3/qwen3/gemma or a template "
                f"that does (or train_on_inputs: true)."
            )
        start = len(before)
        if m["role"] == "assistant":
            prompt = _render(tokenizer, messages[:i], True, where, index)
            if after.startswith(prompt) and len(prompt) >= start:
                start = len(prompt)
        text = m["content"].strip()
        found = after.find(text, start) if text else -1
        if m["role"] != "assistant" and found >= 0:
            start = found
        content_end = found + len(text) if found >= 0 else start
        marker = None
        for token, policy in spec.markers:
            p = after.find(token, content_end)
            if p >= 0 and (marker is None or p < marker[0]):
                marker = (p, p + len(token), policy)
        trained = m["role"] in spec.roles_to_train
        if trained:
            spans.append((start, marker[0] if marker else len(after)))
        if marker:
            markers.append((*marker, trained))
        before = after
    last = len(markers) - 1
    for k, (s, e, policy, trained) in enumerate(markers):
        if policy == "all" or (policy == "turn" and trained) or (policy == "last" and k == last):
            spans.append((s, e))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if spec.train_on_inputs:
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}
    labels = [t if any(s <= a < e for s, e in spans) else -100 for t, (a, _) in zip(ids, enc["offset_mapping"])]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def _render(tokenizer, messages, generation_prompt: bool, where: str, index: int) -> str:
    try:
        return chat_templates.render(tokenizer, messages, generation_prompt)
    except Exception as exc:  # jinja raises many types; the template is user input
        raise DataError(f"{where}: row {index}: the chat template failed: {type(exc).__name__}: {exc}") from None
