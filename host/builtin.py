"""The host's built-in plugin: the ``completion`` and ``chat_template`` dataset types.

Implemented through the same hooks as any external plugin (as pytest does with its own
features), so the host has a single data path.
"""

from __future__ import annotations

import logging
from typing import Any

from host import hookimpl
from host.config import DatasetConfig
from host.data import load_raw, require_columns
from host.errors import DataError

log = logging.getLogger("host.data")


class CompletionDataset(DatasetConfig):
    """Continued pretraining on raw text: documents are joined with EOS and cut into
    ``sequence_len`` blocks, so no row is ever too long and no token is padding."""

    field: str = "text"


class ChatTemplateDataset(DatasetConfig):
    """Conversations rendered with the tokenizer's chat template; loss on assistant turns only."""

    field_messages: str = "messages"
    message_field_role: str = "role"
    message_field_content: str = "content"


@hookimpl
def dataset_types():
    return {"completion": CompletionDataset, "chat_template": ChatTemplateDataset}


@hookimpl
def dataset_strategy(cfg, dataset_cfg, tokenizer):
    if isinstance(dataset_cfg, CompletionDataset):
        return CompletionStrategy(cfg, dataset_cfg, tokenizer)
    if isinstance(dataset_cfg, ChatTemplateDataset):
        return ChatTemplateStrategy(cfg, dataset_cfg, tokenizer)
    return None


def _where(cfg, entry) -> str:
    return f"datasets[{cfg.datasets.index(entry)}] ({entry.path})"


class CompletionStrategy:
    def __init__(self, cfg, entry: CompletionDataset, tokenizer):
        self.cfg, self.entry, self.tokenizer = cfg, entry, tokenizer

    def fingerprint(self) -> dict[str, Any]:
        return {"version": 1, "documents": self.cfg.sample_packing}

    def load(self):
        where = _where(self.cfg, self.entry)
        raw = load_raw(self.entry, where)
        require_columns(raw, [self.entry.field], where)
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise DataError(f"{where}: the tokenizer has no eos_token; completion data needs one between documents.")
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


class ChatTemplateStrategy:
    def __init__(self, cfg, entry: ChatTemplateDataset, tokenizer):
        self.cfg, self.entry, self.tokenizer = cfg, entry, tokenizer

    def fingerprint(self) -> dict[str, Any]:
        return {"version": 1}

    def load(self):
        where = _where(self.cfg, self.entry)
        if not getattr(self.tokenizer, "chat_template", None):
            raise DataError(f"{where}: the tokenizer has no chat_template; use a tokenizer that has one.")
        raw = load_raw(self.entry, where)
        require_columns(raw, [self.entry.field_messages], where)
        try:
            out = raw.map(
                tokenize_conversation,
                with_indices=True,
                fn_kwargs={"entry": self.entry, "tokenizer": self.tokenizer, "where": where},
                remove_columns=raw.column_names,
                desc="chat template",
            )
        except (KeyError, TypeError) as exc:
            raise DataError(
                f"{where}: a message lacks key {exc}; each message needs "
                f"{self.entry.message_field_role!r} and {self.entry.message_field_content!r}."
            ) from None
        return apply_length_policy(out, self.cfg, where)


def _render(tokenizer, messages, generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=True)
    return list(out["input_ids"])


def tokenize_conversation(row, index: int, entry: ChatTemplateDataset, tokenizer, where: str) -> dict[str, list[int]]:
    """Labels are the assistant turns' tokens; everything else is -100.

    Each assistant turn's span is found by rendering the conversation up to it (with the
    generation prompt) and up to its end; this needs no template markers, only that the
    template renders a conversation's prefix as a prefix of the whole.
    """
    messages = [{"role": m[entry.message_field_role], "content": m[entry.message_field_content]} for m in row[entry.field_messages]]
    ids = _render(tokenizer, messages, False)
    labels = [-100] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], True))
        end_ids = _render(tokenizer, messages[: i + 1], False)
        if end_ids != ids[: len(end_ids)]:
            raise DataError(
                f"{where}: row {index}: the chat template does not render a conversation's prefix as a "
                f"prefix of the whole; assistant-only labels cannot be located with this template."
            )
        labels[start : len(end_ids)] = ids[start : len(end_ids)]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def apply_length_policy(ds, cfg, where: str):
    """Rows longer than ``sequence_len``: drop (counted), truncate, or raise naming the row."""
    seq = cfg.sequence_len
    lengths = [len(x) for x in ds["input_ids"]]
    too_long = [i for i, n in enumerate(lengths) if n > seq]
    if too_long and cfg.excess_length_strategy == "raise":
        i = too_long[0]
        raise DataError(
            f"{where}: row {i} has {lengths[i]} tokens, more than sequence_len={seq}. Raise sequence_len, or set "
            f"excess_length_strategy: drop or truncate."
        )
    if too_long and cfg.excess_length_strategy == "truncate":
        ds = ds.map(lambda r: {k: r[k][:seq] for k in ("input_ids", "attention_mask", "labels")}, desc="truncate")
        log.warning("%s: truncated %d row(s) to sequence_len=%d", where, len(too_long), seq)
    elif too_long:
        keep = set(range(len(lengths))) - set(too_long)
        ds = ds.select(sorted(keep))
        log.warning("%s: dropped %d row(s) longer than sequence_len=%d", where, len(too_long), seq)
    if all(all(x == -100 for x in labels) for labels in ds["labels"]) or len(ds) == 0:
        raise DataError(
            f"{where}: no trainable rows left after dropping {len(too_long)} row(s) longer than sequence_len={seq} "
            f"(or no assistant turns). Raise sequence_len or set excess_length_strategy: truncate."
        )
    return ds
