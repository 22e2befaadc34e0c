"""Config-driven tokenizer changes (chat template, added tokens) and the embedding rows they need.

``special_tokens``, ``eot_tokens`` and ``tokens`` are applied to the tokenizer before any data is
prepared; the model then gets room for them (``resize_token_embeddings``) and, with LoRA, the new
tokens' embedding rows become trainable and are saved in the adapter (peft's
``trainable_token_indices``), since a frozen random row could never learn what the token means.
"""

from __future__ import annotations

import logging

from host import chat_templates
from host.errors import ConfigError

log = logging.getLogger("host.model")

#: Tokenizer attribute holding the tokens this run added (read by the model phase).
ADDED = "host_added_tokens"


def apply_to_tokenizer(cfg, tokenizer) -> list[str]:
    """Set the configured chat template and add the configured tokens; returns the new ones."""
    from tokenizers import AddedToken

    template = chat_templates.resolve(cfg, tokenizer)
    if template is not None:
        tokenizer.chat_template = template
    before = set(tokenizer.get_vocab())
    special = getattr(cfg, "special_tokens", None)
    if special is not None:
        named = {k: v for k, v in special.model_dump().items() if k.endswith("_token") and v is not None}
        if named:
            tokenizer.add_special_tokens({k: AddedToken(v, special=True, normalized=False) for k, v in named.items()})
    extra_special = [*(getattr(special, "additional_special_tokens", None) or []), *(getattr(cfg, "eot_tokens", None) or [])]
    missing = [t for t in dict.fromkeys(extra_special) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    plain = [t for t in dict.fromkeys(getattr(cfg, "tokens", None) or []) if t not in tokenizer.get_vocab()]
    if plain:
        tokenizer.add_tokens([AddedToken(t, normalized=False) for t in plain])
    added = [t for t in tokenizer.get_vocab() if t not in before]
    if added:
        log.info("added %d token(s) to the tokenizer: %s", len(added), ", ".join(sorted(added)))
    setattr(tokenizer, ADDED, sorted(added, key=tokenizer.convert_tokens_to_ids))
    return added


def added_token_ids(tokenizer) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in getattr(tokenizer, ADDED, [])]


def fit_embeddings(model, tokenizer) -> None:
    """Grow the input (and output) embeddings when the tokenizer outgrew them."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer))
        log.info("resized token embeddings from %d to %d rows for added tokens", rows, len(tokenizer))


def trainable_token_indices(cfg, model, tokenizer) -> dict[str, list[int]] | None:
    """With LoRA, the embedding (and untied output) rows of the added tokens train and are saved
    with the adapter; unless ``lora_modules_to_save`` already trains those whole layers."""
    ids = added_token_ids(tokenizer)
    if not ids:
        return None
    names = {id(m): n for n, m in model.named_modules()}
    layers = [model.get_input_embeddings()]
    out_layer = model.get_output_embeddings()
    tied = out_layer is not None and out_layer.weight is layers[0].weight
    if out_layer is not None and not tied:
        layers.append(out_layer)
    save = set(cfg.lora_modules_to_save or [])
    out = {}
    for layer in layers:
        name = names.get(id(layer))
        if name is None:
            raise ConfigError("tokens: cannot find the embedding layers to train the added tokens' rows.")
        short = name.rsplit(".", 1)[-1]
        if short in save or name in save:
            continue
        out[short] = ids
    if out:
        log.info(
            "LoRA: the %d added token(s) (ids %s) train their rows of %s (%s), saved in the adapter "
            "(peft trainable_token_indices); the rest of those layers stays frozen",
            len(ids), ids, ", ".join(out), "tied input/output embeddings" if tied else "input and output embeddings",
        )
    return out or None


def save_token_rows_only(peft_model) -> None:
    """Save only the added tokens' rows, not two whole vocabulary-sized layers.

    peft's ``save_embedding_layers="auto"`` sees a resized vocabulary and writes the full input and
    output embeddings into every adapter (GBs for a real model). The trainable-token rows *replace*
    the base rows (peft writes them with ``index_copy``), so they are all a resized base needs.
    """
    import functools

    peft_model.save_pretrained = functools.partial(peft_model.save_pretrained, save_embedding_layers=False)
