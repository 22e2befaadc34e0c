"""Named chat templates (``chat_template:``) and a renderer that returns text, not token ids.

The templates are written for this project in the published turn formats of each family; they
render a conversation's prefix as a prefix of the whole, which is what lets the ``chat_template``
dataset type find each turn's characters (see :func:`render`).
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

from host.errors import ConfigError

log = logging.getLogger("host.data")

_CHATML = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Qwen3: ChatML turns; an assistant turn with a reasoning trace shows it in a <think> block.
_QWEN3 = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' -}}"
    "{%- if m['role'] == 'assistant' and m.get('reasoning_content') -%}"
    "{{- '<think>\\n' + m['reasoning_content'] | trim + '\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{{- m['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_LLAMA3 = (
    "{{- bos_token or '' -}}"
    "{%- for m in messages -%}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

# Gemma: roles `user` and `model`; no system role, so system text opens the next user turn.
_GEMMA = (
    "{{- bos_token or '' -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + m['content'] | trim + '\\n\\n' -%}"
    "{%- else -%}"
    "{{- '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n'"
    " + ns.system + m['content'] | trim + '<end_of_turn>\\n' -}}"
    "{%- set ns.system = '' -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)

# gemma3 has the gemma turn format
TEMPLATES = {"chatml": _CHATML, "qwen3": _QWEN3, "llama3": _LLAMA3, "gemma": _GEMMA, "gemma3": _GEMMA}
CHOICES = ("tokenizer_default", "jinja", *TEMPLATES)
FALLBACK = "tokenizer_default_fallback_"

#: axolotl template names that are a model family's own template, which its checkpoints' tokenizers ship.
#: host does not keep copies: for these it uses the tokenizer's template (as ``tokenizer_default``) and says
#: so once; a tokenizer without one is a data error naming ``chat_template``.
MODEL_OWN = frozenset({
    "mistral_v1", "mistral_v2v3", "mistral_v3_tekken", "mistral_v7_tekken", "cohere", "llama3_2_vision", "llama4",
    "phi_3", "phi_35", "deepseek_v2", "deepseek_v3", "jamba", "qwen_25", "qwen3_5", "falcon_h1", "nemotron_h",
    "exaone", "exaone4", "pixtral", "llava", "qwen2_vl", "gemma3n", "gemma4", "gemma4_unified", "command_a",
    "command_a_tool_use", "command_a_rag", "aya",
})


def resolve(cfg, tokenizer) -> str | None:
    """The Jinja source ``chat_template`` / ``chat_template_jinja`` select for ``tokenizer``
    (``None``: keep the tokenizer's own, which may be absent)."""
    name = cfg.chat_template
    if name is None and cfg.chat_template_jinja:
        name = "jinja"
    if name is None or name == "tokenizer_default" or name in MODEL_OWN:
        return None
    if name == "jinja":
        src = cfg.chat_template_jinja
        if not src:
            raise ConfigError("chat_template: jinja needs chat_template_jinja (the template text or a path to a .jinja file).")
        if "{" in src or "\n" in src:
            return src
        path = Path(src).expanduser()  # no Jinja markup: a path to a template file
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"chat_template_jinja: {src!r} is neither Jinja template text nor a readable "
                              f"template file ({exc}).") from None
    if name.startswith(FALLBACK):
        if getattr(tokenizer, "chat_template", None):
            return None
        name = name[len(FALLBACK):]
    if name not in TEMPLATES:
        raise ConfigError(f"chat_template: {name!r} is not built in; choose one of {', '.join(CHOICES)} "
                          f"or {FALLBACK}<name>.")
    return TEMPLATES[name]


def check_name(value: str | None) -> str | None:
    """Config-time check of a ``chat_template`` value (so ``host validate`` catches typos)."""
    if value is None or value in CHOICES:
        return value
    if value in MODEL_OWN:
        log.warning("chat_template: %r is that model family's own template, which host does not ship; the "
                    "tokenizer's chat template is used (tokenizer_default). Set chat_template: jinja to pin one.", value)
        return value
    if value.startswith(FALLBACK) and value[len(FALLBACK):] in TEMPLATES:
        return value
    raise ValueError(
        f"unknown chat template {value!r}; built in: {', '.join(CHOICES)}, {FALLBACK}<name>. For another family use "
        f"tokenizer_default (the model's own template) or jinja with chat_template_jinja"
    )


@lru_cache(maxsize=16)
def _compiled(source: str):
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def strftime_now(fmt):
        import datetime

        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **kw: __import__("json").dumps(x, indent=indent, ensure_ascii=False)
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return env.from_string(source)


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The text ``tokenizer.chat_template`` makes of ``messages`` (same variables as
    transformers' ``apply_chat_template``: the special tokens, ``add_generation_prompt``)."""
    special = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    return _compiled(tokenizer.chat_template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **{"bos_token": None, "eos_token": None, **special}
    )
