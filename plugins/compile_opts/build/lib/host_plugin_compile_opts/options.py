"""The allowlist of Inductor flags and everything that reads it: validation, apply, restore.

``ALLOWLIST`` is the single source of truth. Validation (``check``) accepts exactly its keys with
exactly its value types, and ``apply``/``restore`` set and undo exactly what ``check`` accepted.
torch is imported lazily: ``check`` needs it only when options are set (to verify the keys exist
on the installed torch), so configs without the key never pay for the import.
"""

from __future__ import annotations

import difflib
import logging
from functools import reduce
from typing import Any

from host.errors import ConfigError

log = logging.getLogger("host.compile_opts")

#: ``torch._inductor.config`` flags a config may set, with the value type each one takes.
#: Dotted keys name nested config (``triton.cudagraphs`` is ``torch._inductor.config.triton.cudagraphs``).
ALLOWLIST: dict[str, type] = {
    "coordinate_descent_tuning": bool,
    "coordinate_descent_check_all_directions": bool,
    "shape_padding": bool,
    "epilogue_fusion": bool,
    "max_autotune_gemm": bool,
    "fx_graph_cache": bool,
    "assume_aligned_inputs": bool,
    "comprehensive_padding": bool,
    "decompose_mem_bound_mm": bool,
    "triton.cudagraphs": bool,
}

_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}

#: Dataset types known to yield rows of exactly ``sequence_len`` tokens (static batch shapes).
FIXED_LENGTH_TYPES = {"completion"}


def type_ok(expected: type, value: Any) -> bool:
    """Strict YAML-level type check: ``1`` is not a bool and ``true`` is not an int."""
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, expected)


def inductor_config():
    """``torch._inductor.config`` (imported on first use)."""
    import torch._inductor.config as config

    return config


def _parent(config, key: str):
    *path, leaf = key.split(".")
    return reduce(getattr, path, config), leaf


def has_flag(config, key: str) -> bool:
    """Whether ``config`` has the (possibly dotted) flag ``key``."""
    try:
        parent, leaf = _parent(config, key)
        getattr(parent, leaf)
    except AttributeError:
        return False
    return True


def read_flag(config, key: str) -> Any:
    parent, leaf = _parent(config, key)
    return getattr(parent, leaf)


def write_flag(config, key: str, value: Any) -> None:
    parent, leaf = _parent(config, key)
    setattr(parent, leaf, value)


# --- validation ----------------------------------------------------------------------------


def _torch_version() -> str:
    import torch

    return torch.__version__


def variable_shape_reasons(cfg) -> list[str]:
    """Why batches in this run may change shape from step to step (empty: static shapes)."""
    if getattr(cfg, "sample_packing", False):
        return ["sample_packing is on: packed batches hold a different number and length of sequences every step"]
    if cfg.pad_to_sequence_len:
        return []
    reasons = []
    for i, entry in enumerate(cfg.datasets):
        if entry.type not in FIXED_LENGTH_TYPES:
            reasons.append(
                f"datasets[{i}] (type {entry.type!r}) yields rows of different lengths and pad_to_sequence_len is "
                f"false, so each batch is padded only to its longest row"
            )
    return reasons


def check(cfg) -> list[str]:
    """Validate ``cfg.torch_compile_options``; raise ConfigError listing every problem, or return warnings."""
    options = getattr(cfg, "torch_compile_options", None)
    if not options:
        return []
    errors = []
    unknown = [k for k in options if k not in ALLOWLIST]
    for key in unknown:
        close = difflib.get_close_matches(key, list(ALLOWLIST), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        errors.append(f"torch_compile_options: {key!r} is not an allowed Inductor flag.{hint}")
    if unknown:
        errors.append(f"torch_compile_options: allowed keys are {', '.join(ALLOWLIST)}.")
    for key, value in options.items():
        expected = ALLOWLIST.get(key)
        if expected is not None and not type_ok(expected, value):
            errors.append(
                f"torch_compile_options.{key}: expected {_TYPE_WORDS[expected]}, got {value!r} "
                f"({type(value).__name__}). Write it as `{key}: {_example(expected)}`."
            )
    if cfg.torch_compile is False:
        errors.append(
            "torch_compile_options: set, but torch_compile is false, so nothing is compiled and the flags would "
            "do nothing. Set torch_compile: true (or auto), or remove torch_compile_options."
        )
    known = [k for k in options if k in ALLOWLIST]
    if known:
        config = inductor_config()
        for key in known:
            if not has_flag(config, key):
                errors.append(
                    f"torch_compile_options.{key}: the installed torch {_torch_version()} has no "
                    f"torch._inductor.config.{key} (renamed or removed in this version). Remove the key, or "
                    f"install a torch that has it."
                )
    if errors:
        raise ConfigError("\n".join(errors))

    warnings = []
    if options.get("triton.cudagraphs") is True:
        reasons = variable_shape_reasons(cfg)
        if reasons:
            warnings.append(
                "torch_compile_options.triton.cudagraphs: CUDA graphs replay fixed tensor shapes, but "
                + "; ".join(reasons)
                + ". Every new shape records another graph (more memory, more warm-up) or makes Inductor skip "
                "cudagraphs for that graph. Set pad_to_sequence_len: true (and no sample packing) for static "
                "shapes, or drop triton.cudagraphs."
            )
    warnings += _mode_overrides(cfg, options)
    return warnings


def _example(expected: type) -> str:
    return {bool: "true", int: "1", float: "1.0", str: "value"}[expected]


def _mode_overrides(cfg, options: dict[str, Any]) -> list[str]:
    """torch.compile's ``mode`` patches Inductor config while compiling, beating global flags."""
    mode = cfg.torch_compile_mode
    if not mode:
        return []
    try:
        from torch._inductor import list_mode_options

        forced = list_mode_options(mode)
    except Exception:  # an unknown mode is torch.compile's error to report, not ours
        return []
    clash = {k: v for k, v in forced.items() if k in options and options[k] != v}
    if not clash:
        return []
    sets = ", ".join(f"{k}={v!r}" for k, v in clash.items())
    return [
        f"torch_compile_options: torch_compile_mode {mode!r} sets {sets} itself while compiling, which "
        f"overrides the value in torch_compile_options. Drop the key or pick a mode that leaves it alone."
    ]


# --- apply / restore -----------------------------------------------------------------------


def apply(options: dict[str, Any], config=None) -> dict[str, Any]:
    """Set each flag on ``torch._inductor.config``; return the previous values for :func:`restore`."""
    config = config if config is not None else inductor_config()
    previous: dict[str, Any] = {}
    try:
        for key, value in options.items():
            if key not in ALLOWLIST:  # check() rejects these; never set anything it did not accept
                raise ConfigError(f"torch_compile_options: {key!r} is not an allowed Inductor flag.")
            old = read_flag(config, key)
            write_flag(config, key, value)
            previous[key] = old
            now = read_flag(config, key)
            if now != value:
                log.warning(
                    "compile_opts: torch._inductor.config.%s stays %r although %r was set: an environment "
                    "variable (TORCHINDUCTOR_*) forces it",
                    key,
                    now,
                    value,
                )
            else:
                log.info("compile_opts: torch._inductor.config.%s = %r (was %r)", key, value, old)
    except Exception:
        restore(previous, config)
        raise
    return previous


def restore(previous: dict[str, Any], config=None) -> None:
    """Put back the values :func:`apply` returned (in reverse order)."""
    config = config if config is not None else inductor_config()
    for key, value in reversed(list(previous.items())):
        write_flag(config, key, value)
        log.info("compile_opts: torch._inductor.config.%s restored to %r", key, value)
