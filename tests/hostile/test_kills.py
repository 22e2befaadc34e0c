"""Runs killed (SIGKILL, from inside the process at a chosen point) and then resumed or restarted."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from host.testing import base_config, offline_env

#: A plugin whose callback SIGKILLs its own process at the point named by $KILL_AT (nothing when unset).
KILLER = '''
    import os
    import signal
    from pathlib import Path

    from transformers import TrainerCallback

    from host import hookimpl


    class Killer(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            if os.environ.get("KILL_AT") == "final_save":
                # what a kill in the middle of save_model leaves: a truncated adapter file
                Path(args.output_dir, "adapter_model.safetensors").write_bytes(b"\\x00" * 10)
                os.kill(os.getpid(), signal.SIGKILL)

        def on_save(self, args, state, control, **kwargs):
            if os.environ.get("KILL_AT") == "first_save" or (
                os.environ.get("KILL_AT") == "second_save" and state.global_step > args.save_steps
            ):
                # the Trainer has written the checkpoint, the host's marker is not there yet
                Path(args.output_dir, f"checkpoint-{state.global_step}", "host_complete").unlink()
                os.kill(os.getpid(), signal.SIGKILL)


    @hookimpl
    def trainer_callbacks(cfg):
        return [Killer()]
'''

HOST = [sys.executable, "-m", "host"]


def _killed_run(site, cfg_path, point):
    env = offline_env(KILL_AT=point, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([*HOST, "train", str(cfg_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("point", ["final_save", "second_save"])
def test_killed_then_resumed_matches_uninterrupted(local_plugin, run_host, write_config, tiny_model, text_file,
                                                    tmp_path, point):
    """final_save: killed while writing the final model (checkpoint-6 is complete): resuming must not
    train step 7. second_save: killed before checkpoint-4 was marked complete: resume from checkpoint-2."""
    site = local_plugin("killer", KILLER)
    common = dict(plugins=["killer"], max_steps=6, save_steps=2, lr_scheduler="constant", lora_dropout=0.1)
    model = tiny_model("qwen3_moe")
    ref_out, run_out = tmp_path / "ref", tmp_path / "run"
    assert run_host("train", write_config(base_config(model, text_file, ref_out, **common), "ref.yaml")).exit_code == 0

    _killed_run(site, write_config(base_config(model, text_file, run_out, **common), "run.yaml"), point)
    assert not (run_out / "run_summary.json").exists()
    if point == "final_save":
        assert (run_out / "checkpoint-6" / "host_complete").exists()
    else:
        assert not (run_out / "checkpoint-4" / "host_complete").exists() and not (run_out / "checkpoint-6").exists()

    resumed = write_config(base_config(model, text_file, run_out, resume_from_checkpoint=True, **common), "res.yaml")
    result = run_host("train", resumed)
    assert result.exit_code == 0, result.output
    assert json.loads((run_out / "run_summary.json").read_text())["steps"] == 6
    assert not (run_out / "checkpoint-7").exists() and not (run_out / "checkpoint-8").exists()
    ref, got = load_file(ref_out / "adapter_model.safetensors"), load_file(run_out / "adapter_model.safetensors")
    assert ref.keys() == got.keys()
    assert max((ref[k] - got[k]).abs().max().item() for k in ref) <= 1e-6


@pytest.mark.slow
def test_killed_before_first_complete_checkpoint_starts_fresh(local_plugin, run_host, write_config, tiny_model,
                                                              text_file, tmp_path):
    site = local_plugin("killer", KILLER)
    out = tmp_path / "out"
    cfg = base_config(tiny_model("qwen3_moe"), text_file, out, plugins=["killer"], max_steps=4, save_steps=2)
    _killed_run(site, write_config(cfg, "run.yaml"), "first_save")
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-2" / "host_complete").exists()
    (out / "tmp-checkpoint-2").mkdir()  # a Trainer staging dir, as older transformers leave them

    resume = run_host("train", write_config({**cfg, "resume_from_checkpoint": True}, "resume.yaml"))
    assert resume.exit_code == 2 and "remove resume_from_checkpoint to start fresh" in resume.output

    fresh = run_host("train", write_config(cfg, "fresh.yaml"))
    assert fresh.exit_code == 0, fresh.output
    assert json.loads((out / "run_summary.json").read_text())["steps"] == 4
    assert not (out / "tmp-checkpoint-2").exists()
    assert (out / "checkpoint-2" / "host_complete").exists()


def test_unrelated_files_still_block_a_fresh_run(run_host, write_config, tiny_model, text_file, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    result = run_host("train", write_config(base_config(tiny_model("qwen3_moe"), text_file, out)))
    assert result.exit_code == 2 and "already holds a previous run" in result.output
    assert (out / "notes.txt").read_text() == "mine" and (out / "checkpoint-2").is_dir()
