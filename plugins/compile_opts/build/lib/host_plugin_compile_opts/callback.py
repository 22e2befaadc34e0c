"""The TrainerCallback that sets the flags around training.

Why ``on_train_begin`` is early enough: the Trainer (through accelerate) wraps the model with
``torch.compile`` while preparing it, but ``torch.compile`` is lazy: Dynamo traces and Inductor
compiles (reading ``torch._inductor.config``) at the first forward of the first training step,
which comes after ``on_train_begin``. Recompiles later in training (a new batch shape, eval mode
during training) also happen before ``on_train_end``, so they see the same flags.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback

from host_plugin_compile_opts import options as opts

log = logging.getLogger("host.compile_opts")


class CompileOptionsCallback(TrainerCallback):
    """Apply ``torch_compile_options`` at train begin; restore the previous values at train end.

    (The host repairs the fp32-matmul-precision state that transformers leaves behind when compiling
    on an Ampere+ GPU, which would otherwise make ``max_autotune_gemm: true`` fail: see
    :mod:`host.precision`.)
    """

    def __init__(self, options: dict[str, Any]):
        self.options = dict(options)
        self.previous: dict[str, Any] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not args.torch_compile:
            log.warning(
                "compile_opts: torch_compile resolved to off for this run (torch_compile: auto without CUDA?); "
                "torch_compile_options not applied"
            )
            return
        if self.previous is None:
            self.previous = opts.apply(self.options)

    def on_train_end(self, args, state, control, **kwargs):
        if self.previous is not None:
            opts.restore(self.previous)
            self.previous = None
