"""A real `host train` on a tiny Qwen3 with torch.compile (Inductor on the CPU) and two options.

Inductor's entry point is wrapped (not replaced) to record the flags it sees at each compile, which
proves they were set before the Trainer's lazy torch.compile ran, and the flags are compared with
their original values after the run. Set TORCHINDUCTOR_CACHE_DIR (scripts/test-all.sh does) so reruns
hit the FX graph cache.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from host.testing import base_config
from host_plugin_compile_opts import options as opts

OPTIONS = {"coordinate_descent_tuning": True, "epilogue_fusion": False}


@pytest.fixture
def compiles(monkeypatch):
    """Records the watched flags' values each time Inductor is asked to compile a graph."""
    import torch._inductor.compile_fx as compile_fx_mod

    config = opts.inductor_config()
    real = compile_fx_mod.compile_fx
    seen: list[dict] = []

    def recording(*args, **kwargs):
        seen.append({k: opts.read_flag(config, k) for k in OPTIONS})
        return real(*args, **kwargs)

    monkeypatch.setattr(compile_fx_mod, "compile_fx", recording)
    return seen


def _flags():
    config = opts.inductor_config()
    return {k: opts.read_flag(config, k) for k in OPTIONS}


def test_train_applies_flags_while_compiling_and_restores_them(
    tiny_model, text_file, write_config, run_host, tmp_path, compiles, caplog
):
    before = _flags()
    assert before != OPTIONS  # both options differ from torch's defaults, so setting them is observable
    caplog.set_level(logging.INFO, logger="host.compile_opts")
    out = tmp_path / "out"
    cfg = base_config(
        tiny_model("qwen3"), text_file, out, plugins=["compile_opts"], max_steps=2, torch_compile=True,
        torch_compile_options=OPTIONS, lora_target_modules=["q_proj"],
    )
    result = run_host("train", write_config(cfg))
    assert result.exit_code == 0, result.output
    assert compiles, "Inductor never compiled: torch_compile did not reach the Trainer"
    assert all(seen == OPTIONS for seen in compiles), compiles
    assert _flags() == before
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 2 and summary["plugins"] == {"compile_opts": "0.1.0"}
    assert "torch._inductor.config.coordinate_descent_tuning = True (was False)" in caplog.text
    assert "torch._inductor.config.epilogue_fusion restored to True" in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto resolves to compile-on with CUDA")
def test_auto_without_cuda_compiles_nothing_and_sets_nothing(
    tiny_model, text_file, write_config, run_host, tmp_path, compiles, caplog
):
    before = _flags()
    cfg = base_config(
        tiny_model("qwen3"), text_file, tmp_path / "out", plugins=["compile_opts"], max_steps=1,
        torch_compile="auto", torch_compile_options=OPTIONS, lora_target_modules=["q_proj"],
    )
    result = run_host("train", write_config(cfg))
    assert result.exit_code == 0, result.output
    assert compiles == [] and _flags() == before
    assert "torch_compile_options not applied" in caplog.text
