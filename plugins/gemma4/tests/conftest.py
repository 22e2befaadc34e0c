import os

# Must precede any import of the kernel module (the @triton.jit decorator reads it). On a CUDA machine the
# kernels run for real, so the interpreter is only switched on where there is no GPU.
try:
    import torch

    _CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _CUDA = False
if not _CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture
def device():
    return "cuda" if _CUDA else "cpu"


def pytest_report_header(config):
    import transformers

    return f"gemma4 plugin tests: transformers {transformers.__version__}, torch {torch.__version__}, cuda={_CUDA}"
