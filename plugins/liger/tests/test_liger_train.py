"""`host train` end to end with the fused loss, sample packing and LoRA (the real CLI and HF Trainer)."""

import json

from host.testing import base_config


def test_host_train_with_fused_loss_and_packing(run_host, write_config, tiny_model, text_file, tmp_path):
    from transformers.models.qwen3 import modeling_qwen3

    plain_forward = modeling_qwen3.Qwen3ForCausalLM.forward
    cfg = base_config(tiny_model("qwen3"), text_file, tmp_path / "out", plugins=["liger"], max_steps=2,
                      sequence_len=32, sample_packing=True, liger_fused_linear_cross_entropy=True,
                      lora_target_modules=["q_proj", "v_proj", "lm_head"])
    result = run_host("train", write_config(cfg))
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert summary["steps"] == 2 and summary["plugins"] == {"liger": "0.1.0"}
    assert 0 < summary["final_train_loss"] < 20
    # liger-kernel's process-wide patches are undone when training ends
    assert modeling_qwen3.Qwen3ForCausalLM.forward is plain_forward
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
