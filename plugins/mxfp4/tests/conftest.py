"""Without CUDA (CI, laptops) the Triton kernels run under the interpreter. This must be set before any test module
imports ``host_plugin_scattermoe.kernels``: ``@triton.jit`` reads it at import."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
