"""Which checkpoints are complete, and whether an output_dir may be (re)used."""

from __future__ import annotations

import json
import logging
import re
import shutil
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


def interrupted_leftovers(output_dir: str | Path) -> list[Path] | None:
    """If ``output_dir`` holds nothing but what an interrupted run leaves before its first complete
    checkpoint (checkpoint directories without the marker, the Trainer's ``tmp-checkpoint-*`` staging
    directories), return those paths; otherwise None. Such a directory holds nothing to keep."""
    out = Path(output_dir)
    entries = list(out.iterdir()) if out.is_dir() else []
    leftovers = [
        p for p in entries
        if p.is_dir() and not p.is_symlink()
        and ((_CKPT.match(p.name) and not (p / COMPLETE_MARKER).exists()) or p.name.startswith("tmp-checkpoint-"))
    ]
    return leftovers if entries and len(leftovers) == len(entries) else None


def remove_staging(output_dir: str | Path) -> None:
    """Remove the Trainer's ``tmp-checkpoint-*`` staging directories a killed run left behind."""
    out = Path(output_dir)
    for p in out.glob("tmp-checkpoint-*") if out.is_dir() else []:
        if p.is_dir() and not p.is_symlink():
            log.warning("removing %s, left by an interrupted checkpoint save", p)
            shutil.rmtree(p)


def resolve_resume(cfg) -> str | None:
    """The checkpoint to resume from, or None for a fresh run; checks output_dir reuse."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: {out} is an existing file, not a directory; choose a directory path (the file was left untouched).")
    if cfg.resume_from_checkpoint in (None, False):
        if out.is_dir() and any(out.iterdir()):
            leftovers = interrupted_leftovers(out)
            if leftovers is None:
                raise ConfigError(
                    f"output_dir: {out} already holds a previous run. Set resume_from_checkpoint: true to "
                    f"continue it, or choose another output_dir (nothing there was changed)."
                )
            log.warning(
                "output_dir %s holds only incomplete checkpoints of an interrupted run (%s); removing them and "
                "starting fresh", out, ", ".join(p.name for p in sorted(leftovers)),
            )
            for p in leftovers:
                shutil.rmtree(p)
        return None
    if cfg.resume_from_checkpoint is True:
        ckpt = latest_complete(out)
        if ckpt is None:
            fresh = (" It holds only incomplete checkpoints of a run killed before its first checkpoint completed: "
                     "remove resume_from_checkpoint to start fresh there (they will be removed)."
                     if interrupted_leftovers(out) else " Remove resume_from_checkpoint to start fresh.")
            raise ConfigError(f"resume_from_checkpoint: no complete checkpoint in {out}.{fresh}")
        remove_staging(out)
        return str(ckpt)
    path = Path(cfg.resume_from_checkpoint)
    if not (path / COMPLETE_MARKER).exists() and not (path / "trainer_state.json").exists():
        raise ConfigError(f"resume_from_checkpoint: {path} is not a complete checkpoint directory.")
    return str(path)


def finished_at(checkpoint: str | Path, max_steps: int | None) -> int | None:
    """The checkpoint's step if it ends training (step >= max_steps, the config's or the one it was
    saved with), else None. Resuming the Trainer from such a checkpoint would run one step too many;
    the host then only restores it and writes the final model (a kill during the final save)."""
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None
    step, target = state.get("global_step", 0), max_steps or state.get("max_steps", 0)
    return step if target and step >= target else None
