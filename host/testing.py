"""Helpers and pytest fixtures for testing host and its plugins offline.

Loaded as a pytest plugin (entry point ``pytest11: host``), so any plugin's tests get the
fixtures ``tiny_tokenizer``, ``tiny_model``, ``make_plugin_manager``, ``write_config`` and
``run_host`` with only ``host`` installed. Nothing here downloads anything.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import pytest

#: Chat template for the tiny tokenizer: plain text turns, so prefixes render as prefixes.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]

#: Small dims applied to whichever of these keys a model's config has.
TINY_DIMS = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_experts": 4,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 512,
}


def sample_texts() -> list[str]:
    """Real English prose from the standard library's docstrings (no files, no network)."""
    import argparse
    import collections
    import csv
    import email
    import functools
    import json as json_mod
    import logging
    import pathlib
    import re
    import subprocess
    import threading
    import unittest

    mods = [argparse, collections, csv, email, functools, json_mod, logging, pathlib, re, subprocess, threading, unittest]
    texts = []
    for mod in mods:
        for obj in [mod, *(getattr(mod, n) for n in dir(mod) if not n.startswith("_"))]:
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 80 and doc not in texts:
                texts.append(doc)
    return texts


def build_tokenizer(texts: list[str], path: str | Path, vocab_size: int = 512):
    """Train a byte-level BPE on ``texts`` and save it as a transformers tokenizer at ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>", bos_token=None, unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return fast


def tiny_config(model_type: str, vocab_size: int, **overrides: Any):
    """A transformers config of ``model_type`` shrunk to test size (any architecture)."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for key, value in TINY_DIMS.items():
        if _has(text_cfg, key):
            setattr(text_cfg, key, value)
    if hasattr(text_cfg, "layer_types") and text_cfg.layer_types is not None:
        text_cfg.layer_types = list(text_cfg.layer_types)[: text_cfg.num_hidden_layers]
    text_cfg.vocab_size = vocab_size
    for key, value in overrides.items():
        setattr(text_cfg if _has(text_cfg, key) or not _has(cfg, key) else cfg, key, value)
    return cfg


def _has(cfg, key: str) -> bool:
    """hasattr that also survives configs whose per-layer attributes raise on plain access."""
    try:
        getattr(cfg, key)
    except Exception:  # e.g. transformers' AmbiguousGlobalPerLayerAttributeError (Gemma 4 head_dim)
        return False
    return True


def build_model(model_type: str, path: str | Path, tokenizer, seed: int = 0, **overrides: Any) -> Path:
    """Save a randomly initialised tiny ``model_type`` causal LM plus ``tokenizer`` at ``path``."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(model_type, len(tokenizer), **overrides)
    for attr in ("eos_token_id", "pad_token_id"):
        setattr(cfg, attr, getattr(tokenizer, attr))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return Path(path)


#: Environment for runs that must not reach a hub (CI, offline machines).
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def offline_env(**extra: str) -> dict[str, str]:
    """``os.environ`` plus :data:`OFFLINE_ENV` (and ``extra``), for subprocess runs of ``host``."""
    return {**os.environ, **OFFLINE_ENV, **extra}


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def base_config(model_dir: str | Path, data_file: str | Path, output_dir: str | Path, **overrides: Any) -> dict:
    """A small, fast LoRA training config dict; override any key."""
    cfg = {
        "base_model": str(model_dir),
        "datasets": [{"path": str(data_file), "type": "completion"}],
        "sequence_len": 64,
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_modules": ["q_proj", "v_proj"],
        "micro_batch_size": 2,
        "max_steps": 6,
        "learning_rate": 5e-3,
        "lr_scheduler": "constant",
        "logging_steps": 1,
        "output_dir": str(output_dir),
        "seed": 0,
    }
    cfg.update(overrides)
    return cfg


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch):
    """No hub access: what CI and users without network have."""
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer trained on stdlib docstrings, with a chat template."""
    return build_tokenizer(sample_texts(), tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_tokenizer):
    """``tiny_model("qwen3_moe", **overrides) -> Path`` of a saved random tiny model (cached)."""
    cache: dict[tuple, Path] = {}

    def make(model_type: str = "qwen3_moe", **overrides: Any) -> Path:
        key = (model_type, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = build_model(model_type, tmp_path_factory.mktemp(model_type), tiny_tokenizer, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """A jsonl file of documents in a ``text`` column."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "text.jsonl", [{"text": t} for t in sample_texts()])


@pytest.fixture
def make_plugin_manager():
    """``make_plugin_manager(["name", ...]) -> pluggy.PluginManager`` built like a real run."""
    from host.plugins import build_plugin_manager

    return build_plugin_manager


@pytest.fixture
def write_config(tmp_path):
    """``write_config(dict) -> Path`` of a YAML file in the test's tmp dir."""
    import yaml

    def write(cfg: dict, name: str = "cfg.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    return write


@pytest.fixture
def run_host(offline, monkeypatch, tmp_path):
    """``run_host("train", cfg_path) -> Result``: the real CLI, in-process, offline, in a tmp cwd."""
    from typer.testing import CliRunner

    from host.cli import app

    monkeypatch.chdir(tmp_path)

    def run(*args: str | os.PathLike):
        return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)

    return run


def write_plugin_dist(
    site: str | Path, name: str, source: str, version: str = "0.1.0", distribution: str | None = None
) -> Path:
    """Make ``name`` an installed plugin in directory ``site``: its module plus a ``.dist-info``
    with the ``host.plugins`` entry point, exactly what pip would leave. Put ``site`` on
    ``sys.path`` (or PYTHONPATH for a subprocess) to use it. ``distribution`` (default
    ``host-plugin-<name>``) names the distribution; its module is named after it."""
    site = Path(site)
    site.mkdir(parents=True, exist_ok=True)
    distribution = distribution or f"host-plugin-{name.replace('_', '-')}"
    module = distribution.replace("-", "_")
    (site / f"{module}.py").write_text(inspect.cleandoc(source) + "\n")
    info = site / f"{module}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[host.plugins]\n{name} = {module}\n")
    (info / "RECORD").write_text("")
    return site


@pytest.fixture
def local_plugin(tmp_path, monkeypatch):
    """``local_plugin(name, source) -> site dir``: install a one-file plugin for this test only.

    The module is dropped from ``sys.modules`` when it is written and when the test ends, so a later
    test (or a second call in this one) that reuses the name imports its own source, never this one's."""
    import importlib
    import sys

    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    modules: set[str] = set()

    def forget() -> None:
        for module in modules:
            for loaded in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
                del sys.modules[loaded]
        importlib.invalidate_caches()

    def make(name: str, source: str) -> Path:
        modules.add(f"host_plugin_{name}")
        forget()
        for stale in (site / "__pycache__").glob(f"host_plugin_{name}.*"):  # same second, same size: stale
            stale.unlink()
        write_plugin_dist(site, name, source)
        importlib.invalidate_caches()
        return site

    yield make
    forget()
