"""``deepspeed: <ZeRO JSON>``: checks that need no GPU, so a bad file fails at ``host validate``.

The JSON goes to the HF Trainer (``TrainingArguments.deepspeed``), which fills its ``"auto"``
values from the config's keys and hands it to accelerate's DeepSpeed engine.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

GATHER_KEYS = ("gather_16bit_weights_on_model_save", "stage3_gather_16bit_weights_on_model_save")


def read(path: str) -> tuple[dict[str, Any] | None, str | None]:
    """``(json, None)`` or ``(None, error message)`` for the file ``deepspeed`` names."""
    p = Path(path)
    if not p.is_file():
        return None, (
            f"deepspeed: {path!r} is not a file (relative paths are read from the current directory). "
            "Point it at a ZeRO JSON such as examples/deepspeed/zero2.json."
        )
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"deepspeed: {path!r} is not valid JSON ({exc}). Fix the file."
    if not isinstance(data, dict):
        return None, f"deepspeed: {path!r} must hold a JSON object (zero_optimization, bf16, ...)."
    return data, None


def stage(data: dict[str, Any]) -> int:
    return int((data.get("zero_optimization") or {}).get("stage", 0))


def errors(cfg) -> list[str]:
    """Everything wrong with ``cfg.deepspeed`` and its combination with other keys."""
    if not cfg.deepspeed:
        return []
    out = []
    if cfg.fsdp_enabled:
        out.append("deepspeed/fsdp: both shard the model; use one of them (remove fsdp/fsdp_config or deepspeed).")
    if importlib.util.find_spec("deepspeed") is None:
        out.append("deepspeed: the deepspeed package is not installed; pip install deepspeed (DS_BUILD_OPS=0 builds no ops ahead).")
    data, error = read(cfg.deepspeed)
    if error:
        return out + [error]
    zero = data.get("zero_optimization") or {}
    if not isinstance(zero, dict) or stage(data) not in (0, 1, 2, 3):
        out.append(f"deepspeed: {cfg.deepspeed}: zero_optimization.stage must be 0, 1, 2 or 3.")
    elif stage(data) == 3 and not any(zero.get(k) for k in GATHER_KEYS):
        out.append(
            f"deepspeed: {cfg.deepspeed}: ZeRO-3 shards the weights, and host saves the trained model/adapter at the "
            "end; set zero_optimization.gather_16bit_weights_on_model_save: true."
        )
    for key, value in (("train_micro_batch_size_per_gpu", cfg.micro_batch_size),
                       ("gradient_accumulation_steps", cfg.gradient_accumulation_steps)):
        given = data.get(key, "auto")
        if given != "auto" and given != value:
            out.append(f"deepspeed: {cfg.deepspeed}: {key} is {given} but the config says {value}; write \"auto\" in the JSON.")
    return out
