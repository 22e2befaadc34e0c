"""Config checks about files and directories, run by ``host validate`` before anything loads.

A value that can only be a local path (``/abs``, ``./rel``, ``~/x``, ``a/b/c``) must exist when the
run reads it; a hub id (``name`` or ``org/name``) is left to the loader, which works offline from
the hub cache. Places the run writes to must not be regular files.
"""

from __future__ import annotations

import re
from pathlib import Path

from host.errors import ConfigError

_HUB_ID = re.compile(r"^[A-Za-z0-9_][\w.-]*(/[\w.-]+)?$")


def looks_local(value: str) -> bool:
    """True when ``value`` cannot be a hub id, so it must name a local file or directory."""
    return not _HUB_ID.match(value) or value.startswith((".", "~")) or value.endswith("/")


def check_paths(cfg, source: str) -> None:
    """Raise ConfigError for a read path that does not exist or a write path that is a file."""
    for key in ("base_model", "tokenizer"):
        value = getattr(cfg, key, None)
        if isinstance(value, str) and looks_local(value) and not Path(value).expanduser().exists():
            raise ConfigError(
                f"{source}: {key}: {value} does not exist. It is a local path (not a hub id such as "
                f"'org/name'); check the path or build the model there first."
            )
    resume = cfg.resume_from_checkpoint
    if isinstance(resume, str) and not Path(resume).expanduser().is_dir():
        raise ConfigError(
            f"{source}: resume_from_checkpoint: {resume} is not a directory. Give a checkpoint directory "
            f"(output_dir/checkpoint-N), or true for the latest complete checkpoint in output_dir."
        )
    for key in ("output_dir", "dataset_prepared_path"):
        value = getattr(cfg, key, None)
        if isinstance(value, str) and Path(value).expanduser().exists() and not Path(value).expanduser().is_dir():
            raise ConfigError(
                f"{source}: {key}: {value} is an existing file, not a directory; choose a directory path "
                f"(the file was left untouched)."
            )
