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


class GradNormLog(TrainerCallback):
    """Adds ``grad_norm_clipped`` beside the Trainer's ``grad_norm`` in every log record.

    The Trainer logs the total gradient norm *before* clipping (what ``clip_grad_norm_`` returns);
    the update uses the gradients scaled to at most ``max_grad_norm``. This callback runs before the
    plugins' callbacks, so their ``on_log`` sees both numbers for the same step."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and isinstance(logs.get("grad_norm"), (int, float)):
            norm, limit = float(logs["grad_norm"]), args.max_grad_norm
            # torch scales by limit / (norm + 1e-6) when that is below 1
            logs["grad_norm_clipped"] = norm * min(1.0, limit / (norm + 1e-6)) if limit and limit > 0 else norm


class EarlyStopping(TrainerCallback):
    """axolotl's ``early_stopping_patience``: stop once ``eval_loss`` has not improved for
    ``patience`` evaluations in a row (without the Trainer's load-best-model machinery, so it
    works with any checkpoint schedule)."""

    def __init__(self, patience: int):
        self.patience, self.best, self.bad = patience, float("inf"), 0

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        if loss is None:
            return
        if loss < self.best:
            self.best, self.bad = loss, 0
        else:
            self.bad += 1
            if self.bad >= self.patience:
                control.should_training_stop = True


class StepTimer(TrainerCallback):
    """Steady-state speed over the second half of training (compilation and autotuning happen early).

    The device is synchronised only at the two ends of the steady window (the end of step
    ``max_steps // 2`` and of the last step), so the window's wall time covers all queued GPU work,
    data loading, logging, and any evaluation or checkpoint inside it, while no step in between loses
    its CPU/GPU overlap. (Timing each step on the host alone would count only enqueue time for steps
    that do not synchronise.)"""

    def __init__(self):
        self.ends: list[tuple[int, float]] = []
        self.window: tuple[int, float, int, float] | None = None
        self._start: tuple[int, float] | None = None

    def on_step_end(self, args, state, control, **kwargs):
        first = max(state.max_steps // 2, 1)
        if state.global_step in (first, state.max_steps) and state.max_steps > first:
            _synchronize()
            now = time.perf_counter()
            if state.global_step == first:
                self._start = (state.global_step, now)
            elif self._start is not None:
                self.window = (*self._start, state.global_step, now)
        else:
            now = time.perf_counter()
        self.ends.append((state.global_step, now))

    def median_step_s(self) -> float | None:
        """Median time between step ends in the second half of the run."""
        late = self.ends[len(self.ends) // 2 :]
        gaps = [t1 - t0 for (_, t0), (_, t1) in zip(late, late[1:])]
        return statistics.median(gaps) if gaps else None

    def steady_step_s(self) -> float | None:
        """Mean step time over the synchronised steady window; None if the run did not cover it
        (stopped early, or resumed past its start)."""
        if self.window is None:
            return None
        s0, t0, s1, t1 = self.window
        return (t1 - t0) / (s1 - s0)


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
