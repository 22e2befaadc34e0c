"""Real `host train` runs on tiny models: artifacts, reuse rules, merge, kill-and-resume."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from host.testing import base_config, offline_env

HOST = [sys.executable, "-m", "host"]


def test_train_moe_lora_writes_artifacts(run_host, write_config, tiny_model, text_file, tmp_path):
    out = tmp_path / "out"
    cfg = base_config(
        tiny_model("qwen3_moe"), text_file, out,
        lora_target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        max_steps=12, val_set_size=0.1, eval_steps=6, save_steps=6,
    )
    result = run_host("train", write_config(cfg))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 12 and summary["tokens"] == 12 * 2 * 64
    assert summary["final_train_loss"] < summary["first_train_loss"]
    assert summary["final_eval_loss"] is not None and summary["tokens_per_s"] > 0
    assert summary["steady_tokens_per_s"] > 0 and summary["median_step_s"] > 0
    assert (out / "loss.png").stat().st_size > 1000
    adapter = load_file(out / "adapter_model.safetensors")
    assert any("experts" in k for k in adapter), "expert LoRA parameters were not saved"
    assert (out / "checkpoint-6" / "host_complete").exists()


def test_step_timer_window_covers_the_second_half():
    """Steady speed = wall time between the ends of step max_steps//2 and the last step, per step."""
    from types import SimpleNamespace

    from host.callbacks import StepTimer

    timer, state = StepTimer(), SimpleNamespace(global_step=0, max_steps=6)
    for step in range(1, 7):
        time.sleep(0.05 if step <= 3 else 0.02)  # slow warm-up, then steady steps
        state.global_step = step
        timer.on_step_end(None, state, None)
    assert 0.018 < timer.steady_step_s() < 0.035
    assert 0.018 < timer.median_step_s() < 0.035
    resumed = StepTimer()
    resumed.on_step_end(None, SimpleNamespace(global_step=6, max_steps=6), None)
    assert resumed.steady_step_s() is None


def test_output_dir_in_use_is_refused(run_host, write_config, tiny_model, text_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = run_host("train", write_config(base_config(tiny_model("qwen3_moe"), text_file, out)))
    assert result.exit_code == 2 and "already holds a previous run" in result.output
    assert (out / "precious.txt").read_text() == "keep me"


def test_resume_without_checkpoint(run_host, write_config, tiny_model, text_file, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-3").mkdir(parents=True)  # incomplete: no marker
    result = run_host("train", write_config(base_config(tiny_model("qwen3_moe"), text_file, out, resume_from_checkpoint=True)))
    assert result.exit_code == 2 and "no complete checkpoint" in result.output


def test_merge_lora_gives_same_logits(run_host, write_config, tiny_model, text_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    model_dir = tiny_model("qwen3_moe")
    cfg_path = write_config(base_config(model_dir, text_file, out, max_steps=4))
    assert run_host("train", cfg_path).exit_code == 0
    result = run_host("merge-lora", cfg_path)
    assert result.exit_code == 0, result.output
    ids = torch.tensor([[5, 17, 42, 99, 7, 300]])
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out).eval()
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        a, b, c = merged(ids).logits, peft(ids).logits, base(ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-4), "adapter had no effect"


def _final_adapter(out: Path) -> dict:
    return load_file(out / "adapter_model.safetensors")


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(write_config, tiny_model, text_file, tmp_path):
    common = dict(
        # dropout makes the result depend on the restored RNG state, not only on weights and data order
        max_steps=40, save_steps=5, lr_scheduler="cosine", learning_rate=3e-3, lora_dropout=0.1,
    )
    model = tiny_model("qwen3_moe")
    ref_out, run_out = tmp_path / "ref", tmp_path / "run"
    ref = subprocess.run([*HOST, "train", str(write_config(base_config(model, text_file, ref_out, **common), "ref.yaml"))],
                         env=offline_env(), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-3000:]

    cfg = write_config(base_config(model, text_file, run_out, **common), "run.yaml")
    proc = subprocess.Popen([*HOST, "train", str(cfg)], env=offline_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run_out / "checkpoint-10" / "host_complete").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.01)
    assert proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_out / "run_summary.json").exists()

    resumed = write_config(base_config(model, text_file, run_out, resume_from_checkpoint=True, **common), "resume.yaml")
    done = subprocess.run([*HOST, "train", str(resumed)], env=offline_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((run_out / "run_summary.json").read_text())["steps"] == 40
    ref, got = _final_adapter(ref_out), _final_adapter(run_out)
    assert ref.keys() == got.keys()
    worst = max((ref[k] - got[k]).abs().max().item() for k in ref)
    assert worst <= 1e-6, f"max abs difference {worst}"


def test_attn_implementation_reaches_the_model(tiny_model):
    from host import model as model_mod
    from host.config import HostConfig

    cfg = HostConfig(base_model=str(tiny_model("qwen3_moe")), attn_implementation="eager")
    assert model_mod.load_model(cfg).config._attn_implementation == "eager"
    cfg = HostConfig(base_model=str(tiny_model("qwen3_moe")), attn_implementation="sdpa")
    assert model_mod.load_model(cfg).config._attn_implementation == "sdpa"


@pytest.mark.parametrize("key, value", [("optimizer", "adamw_nope"), ("lr_scheduler", "zigzag")])
def test_bad_training_names_are_config_errors(run_host, write_config, tiny_model, text_file, tmp_path, key, value):
    result = run_host("train", write_config(base_config(tiny_model("qwen3_moe"), text_file, tmp_path / "o", **{key: value})))
    assert result.exit_code == 2 and value in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o" / "run_summary.json").exists()
