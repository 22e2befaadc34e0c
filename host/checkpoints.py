"""Which checkpoints are complete, and whether an output_dir may be (re)used."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from host.errors import ConfigError

log = logging.getLogger("host.train")

#: Written by the host after the Trainer has finished saving a checkpoint directory.
COMPLETE_MARKER = "host_complete"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def latest_complete(output_dir: str | Path) -> Path | None:
    """The highest-step checkpoint holding the completion marker; incomplete ones are skipped
    with a warning (a run killed while saving leaves one behind)."""
    out = Path(output_dir)
    if not out.is_dir():
        return None
    found = sorted(
        ((int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := _CKPT.match(p.name))),
        reverse=True,
    )
    for _, path in found:
        if (path / COMPLETE_MARKER).exists():
            return path
        log.warning("skipping incomplete checkpoint %s (no %s marker)", path, COMPLETE_MARKER)
    return None


def resolve_resume(cfg) -> str | None:
    """The checkpoint to resume from, or None for a fresh run; checks output_dir reuse."""
    out = Path(cfg.output_dir)
    if cfg.resume_from_checkpoint in (None, False):
        if out.is_dir() and any(out.iterdir()):
            raise ConfigError(
                f"output_dir: {out} already holds a previous run. Set resume_from_checkpoint: true to "
                f"continue it, or choose another output_dir (nothing there was changed)."
            )
        return None
    if cfg.resume_from_checkpoint is True:
        ckpt = latest_complete(out)
        if ckpt is None:
            raise ConfigError(
                f"resume_from_checkpoint: no complete checkpoint in {out}. Set resume_from_checkpoint: false "
                f"with a new output_dir to start fresh."
            )
        return str(ckpt)
    path = Path(cfg.resume_from_checkpoint)
    if not (path / COMPLETE_MARKER).exists() and not (path / "trainer_state.json").exists():
        raise ConfigError(f"resume_from_checkpoint: {path} is not a complete checkpoint directory.")
    return str(path)
