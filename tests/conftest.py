"""Shared by the tests that run several real plugins together (their Triton kernels run in the interpreter on CPU)."""

import json

import pytest


@pytest.fixture
def triton_off_gpu(monkeypatch):
    """Triton kernels run in the interpreter when there is no GPU."""
    import torch

    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def config_only_model(tmp_path):
    """``(model_type, folder="") -> path`` of a model folder under tmp_path holding only a config.json: enough for
    validation."""

    def make(model_type: str, folder: str = "") -> str:
        path = tmp_path / folder
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps({"model_type": model_type}))
        return str(path)

    return make
