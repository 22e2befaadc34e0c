"""The host's own Trainer callbacks."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from transformers import TrainerCallback

from host.checkpoints import COMPLETE_MARKER


class MarkComplete(TrainerCallback):
    """Mark a checkpoint complete once the Trainer has written all of it (resume skips the rest)."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                (ckpt / COMPLETE_MARKER).write_text(str(state.global_step))


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step, for a steady-state speed that ignores warm-up steps."""

    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)

    def median_step_s(self) -> float | None:
        """Median over the second half of the steps (compilation and autotuning happen early)."""
        steady = self.times[len(self.times) // 2 :]
        return statistics.median(steady) if steady else None
