"""axolotl's model-side keys (host.model_keys): unfrozen_parameters, freeze_mm_modules, model_config,
model_quantization_config(_kwargs), flash_attention. Tiny real transformers models on CPU."""

import json

import pytest
import torch
from safetensors.torch import load_file

from host.testing import base_config


def _load(cfg_path, monkeypatch):
    """config + plugin manager + the model phase, as ``host train`` runs it (no Trainer)."""
    from host import model as model_mod
    from host.config import load_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg, pm, _ = load_config(cfg_path)
    tokenizer, _ = model_mod.load_tokenizer_phase(cfg, pm)
    return cfg, model_mod.load_model_phase(cfg, pm, tokenizer)


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory, tiny_tokenizer):
    """A random tiny Gemma3ForConditionalGeneration (SigLIP vision tower + projector) with a tokenizer."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    path = tmp_path_factory.mktemp("gemma3_vlm")
    n = len(tiny_tokenizer)
    cfg = Gemma3Config(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=n + 3, max_position_embeddings=256, sliding_window=64),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        mm_tokens_per_image=4, boi_token_index=n, eoi_token_index=n + 1, image_token_index=n + 2,
        eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    Gemma3ForConditionalGeneration(cfg).save_pretrained(str(path))
    tiny_tokenizer.save_pretrained(str(path))
    return path


# --- unfrozen_parameters ----------------------------------------------------------------------------


def test_unfrozen_parameters_full_fine_tuning_trains_only_the_matches(run_host, write_config, tiny_model, text_file, tmp_path):
    model_dir, out = tiny_model("qwen3"), tmp_path / "out"
    cfg = base_config(model_dir, text_file, out, adapter=None, lora_target_modules=None, max_steps=3, save_strategy="no",
                      unfrozen_parameters=["^model.layers.1.mlp.+", "^model.norm.weight$", "^model.embed_tokens.weight$[:40]"])
    result = run_host("train", write_config(cfg))
    assert result.exit_code == 0, result.output
    before, after = load_file(model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight",
                       "model.layers.1.mlp.down_proj.weight", "model.norm.weight", "model.embed_tokens.weight"}
    emb0, emb1 = before["model.embed_tokens.weight"], after["model.embed_tokens.weight"]
    assert not torch.equal(emb0[:40], emb1[:40]) and torch.equal(emb0[40:], emb1[40:])  # only rows [:40] train


def test_unfrozen_parameters_bad_or_unmatched_regex_is_an_error(run_host, write_config, tiny_model, text_file, tmp_path):
    bad = base_config(tiny_model("qwen3"), text_file, tmp_path / "a", unfrozen_parameters=["model.layers.(0"])
    result = run_host("validate", write_config(bad, "bad.yaml"))
    assert result.exit_code == 2 and "unfrozen_parameters" in result.output and "model.layers.(0" in result.output
    none = base_config(tiny_model("qwen3"), text_file, tmp_path / "b", adapter=None, lora_target_modules=None,
                       unfrozen_parameters=["^model.layers.0.+", "^model.vision_tower.+"])
    result = run_host("train", write_config(none, "none.yaml"))
    assert result.exit_code == 2
    assert "unfrozen_parameters: '^model.vision_tower.+' matches no parameter of Qwen3ForCausalLM" in result.output
    assert "model.embed_tokens.weight" in result.output  # real names, to write the pattern from
    reentrant = base_config(tiny_model("qwen3"), text_file, tmp_path / "c", unfrozen_parameters=["^model.+"],
                            gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    result = run_host("validate", write_config(reentrant, "r.yaml"))
    assert result.exit_code == 2 and "use_reentrant: must be false with unfrozen_parameters" in result.output
    ranged = base_config(tiny_model("qwen3"), text_file, tmp_path / "d", unfrozen_parameters=["^model.embed_tokens.weight$[:8]"],
                         fsdp_config={"version": 2})
    result = run_host("validate", write_config(ranged, "f.yaml"))
    assert result.exit_code == 2 and "row range of '^model.embed_tokens.weight$[:8]' is applied by a gradient hook" in result.output


def test_unfrozen_parameters_with_lora_limits_which_adapter_weights_train(write_config, tiny_model, text_file, tmp_path, monkeypatch, caplog):
    cfg = base_config(tiny_model("qwen3"), text_file, tmp_path / "o", unfrozen_parameters=["^model.layers.0.+", "^lm_head.+"])
    _, model = _load(write_config(cfg), monkeypatch)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".layers.0." in n and ".lora_" in n for n in trainable)  # layer 1's LoRA is frozen
    assert any(".layers.1." in n and ".lora_" in n for n, _ in model.named_parameters())
    assert "'^lm_head.+' matches only base weights" in caplog.text  # lm_head stays frozen: said, not silent


# --- freeze_mm_modules ------------------------------------------------------------------------------


def test_freeze_mm_modules_freezes_the_vision_tower_and_projector(run_host, write_config, tiny_vlm, text_file, tmp_path):
    out = tmp_path / "out"
    cfg = base_config(tiny_vlm, text_file, out, adapter=None, lora_target_modules=None, max_steps=2, save_strategy="no",
                      freeze_mm_modules=True)
    result = run_host("train", write_config(cfg))
    assert result.exit_code == 0, result.output
    before, after = load_file(tiny_vlm / "model.safetensors"), load_file(out / "model.safetensors")
    # transformers saves Gemma 3 in its checkpoint layout: vision_tower.*, language_model.model.*
    mm = [k for k in before if k.startswith(("vision_tower.", "multi_modal_projector."))]
    lm = [k for k in before if k.startswith("language_model.model.layers.")]
    assert mm and lm
    assert mm and all(torch.equal(before[k], after[k]) for k in mm)
    assert all(not torch.equal(before[k], after[k]) for k in lm if k.endswith("proj.weight"))


def test_freeze_mm_modules_keeps_lora_off_the_vision_tower(write_config, tiny_vlm, text_file, tmp_path, monkeypatch):
    def lora_names(**keys):
        cfg = base_config(tiny_vlm, text_file, tmp_path / "o", lora_target_modules=None, lora_target_linear=True, **keys)
        _, model = _load(write_config(cfg, f"{len(keys)}.yaml"), monkeypatch)
        return [n for n, p in model.named_parameters() if p.requires_grad]

    plain, frozen = lora_names(), lora_names(freeze_mm_modules=True)
    assert any("vision_tower" in n for n in plain)  # lora_target_linear alone reaches the vision tower
    assert frozen and not any("vision_tower" in n or "multi_modal_projector" in n for n in frozen)
    assert {n for n in plain if "language_model" in n} == set(frozen)


# --- model_config / overrides_of_model_config --------------------------------------------------------


def test_model_config_overrides_the_config_before_the_model_is_built(write_config, run_host, tiny_model, text_file, tmp_path, monkeypatch):
    base = base_config(tiny_model("mixtral"), text_file, tmp_path / "o", lora_target_modules=["q_proj"])
    _, plain = _load(write_config(base, "plain.yaml"), monkeypatch)
    assert plain.config.output_router_logits is False
    _, model = _load(write_config({**base, "model_config": {"output_router_logits": True}}, "on.yaml"), monkeypatch)
    assert model.config.output_router_logits is True
    batch = torch.tensor([[1, 2, 3, 4]])
    assert model(input_ids=batch, labels=batch).aux_loss is not None  # the router loss is now computed
    assert plain(input_ids=batch, labels=batch).aux_loss is None
    same = {**base, "model_config": {"output_router_logits": True}, "overrides_of_model_config": {"output_router_logits": True}}
    assert run_host("validate", write_config(same, "same.yaml")).exit_code == 0
    typo = {**base, "model_config": {"output_router_logit": True}}
    result = run_host("validate", write_config(typo, "typo.yaml"))
    assert result.exit_code == 2
    assert "overrides_of_model_config (model_config): MixtralConfig has no attribute 'output_router_logit'" in result.output
    clash = {**base, "model_config": {"output_router_logits": True}, "overrides_of_model_config": {"output_router_logits": False}}
    result = run_host("validate", write_config(clash, "clash.yaml"))
    assert result.exit_code == 2 and "two spellings of one key" in result.output
    result = run_host("validate", write_config({**base, "model_config": "output_router_logits"}, "str.yaml"))
    assert result.exit_code == 2 and "model_config: expected a mapping of config attributes" in result.output


# --- model_quantization_config -----------------------------------------------------------------------


def test_model_quantization_config_is_passed_to_from_pretrained(write_config, tiny_model, text_file, tmp_path, monkeypatch):
    """On a dense checkpoint the quantizer stays attached (LoRA trains on top); that shows the object arrived."""
    from transformers import Mxfp4Config

    cfg = base_config(tiny_model("gpt_oss"), text_file, tmp_path / "o", lora_target_modules=["q_proj"],
                      model_quantization_config="Mxfp4Config", model_quantization_config_kwargs={"dequantize": True})
    _, model = _load(write_config(cfg), monkeypatch)
    quant = model.get_base_model().hf_quantizer.quantization_config
    assert isinstance(quant, Mxfp4Config) and quant.dequantize is True


def _mxfp4_checkpoint(dense_dir, out):
    """``dense_dir`` (a tiny gpt-oss) re-saved as gpt-oss ships: experts as MXFP4 ``*_blocks``/``*_scales``
    (random FP4 codes, scale 2^-3) and ``quantization_config.quant_method: mxfp4`` in config.json."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(dense_dir, out)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, t in load_file(out / "model.safetensors").items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            experts, k, n = t.shape  # transformers [E, in, out]; gpt-oss stores [E, out, in/32, 16] packed FP4
            tensors[name + "_blocks"] = torch.randint(0, 256, (experts, n, k // 32, 16), dtype=torch.uint8, generator=g)
            tensors[name + "_scales"] = torch.full((experts, n, k // 32), 124, dtype=torch.uint8)
        else:
            tensors[name] = t
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_mxfp4_dequantize_full_fine_tunes_an_mxfp4_checkpoint(run_host, write_config, tiny_model, text_file, tmp_path, monkeypatch):
    """gpt-oss's published FFT configs: an MXFP4 checkpoint, dequantized while it loads, trained in full."""
    model_dir = _mxfp4_checkpoint(tiny_model("gpt_oss"), tmp_path / "mxfp4")
    keys = dict(adapter=None, lora_target_modules=None, model_quantization_config="Mxfp4Config",
                model_quantization_config_kwargs={"dequantize": True})
    _, model = _load(write_config(base_config(model_dir, text_file, tmp_path / "o", **keys), "load.yaml"), monkeypatch)
    experts = model.model.layers[0].mlp.experts.gate_up_proj
    assert not getattr(model, "is_quantized", False) and experts.requires_grad
    assert experts.unique().numel() <= 15  # the FP4 grid (times the scale): dequantized from the blocks
    out = tmp_path / "out"
    result = run_host("train", write_config(base_config(model_dir, text_file, out, max_steps=1, save_strategy="no", **keys)))
    assert result.exit_code == 0, result.output
    saved = load_file(out / "model.safetensors")
    name = next(k for k in saved if k.endswith("layers.0.mlp.experts.gate_up_proj"))
    assert not torch.equal(saved[name], experts.detach().to(saved[name].dtype))  # dense, and trained


def test_model_quantization_config_errors_name_the_key(run_host, write_config, tiny_model, text_file, tmp_path):
    def validate(name, **keys):
        return run_host("validate", write_config(base_config(tiny_model("qwen3"), text_file, tmp_path / "o", **keys), name))

    result = validate("a.yaml", model_quantization_config="Mxfp5Config")
    assert result.exit_code == 2 and "model_quantization_config" in result.output and "no quantization-config class 'Mxfp5Config'" in result.output
    assert "Mxfp4Config" in result.output  # the known classes are listed
    result = validate("b.yaml", model_quantization_config="Mxfp4Config", model_quantization_config_kwargs={"dequantise": True})
    assert result.exit_code == 2 and "model_quantization_config_kwargs" in result.output and "'dequantise'" in result.output
    result = validate("c.yaml", model_quantization_config_kwargs={"dequantize": True})
    assert result.exit_code == 2 and "set model_quantization_config too" in result.output
    assert validate("d.yaml", model_quantization_config="Mxfp4Config", model_quantization_config_kwargs={"dequantize": True}).exit_code == 0


def test_a_plugin_setting_quantization_config_too_is_a_conflict(write_config, tiny_model, text_file, tmp_path, local_plugin, make_plugin_manager):
    from host.config import load_config
    from host.errors import PluginError
    from host.model import plugin_init_kwargs

    local_plugin("quant4", """
        from host import hookimpl

        @hookimpl
        def model_init_kwargs(cfg, purpose):
            return {"quantization_config": object()}
    """)
    cfg = base_config(tiny_model("qwen3"), text_file, tmp_path / "o", plugins=["quant4"], model_quantization_config="Mxfp4Config")
    cfg, pm, _ = load_config(write_config(cfg))
    with pytest.raises(PluginError, match="'quant4' sets from_pretrained argument 'quantization_config', which model_quantization_config sets too"):
        plugin_init_kwargs(cfg, pm, "train")


# --- flash_attention --------------------------------------------------------------------------------


def test_flash_attention_true_is_attn_implementation_flash_attention_2(run_host, write_config, tiny_model, text_file, tmp_path):
    from host.config import load_config

    cfg = base_config(tiny_model("qwen3"), text_file, tmp_path / "o", flash_attention=True)
    resolved, _, warnings = load_config(write_config(cfg))
    assert resolved.attn_implementation == "flash_attention_2"
    assert [w for w in warnings if w.startswith("flash_attention: read as attn_implementation: flash_attention_2")]
    off, _, _ = load_config(write_config({**cfg, "flash_attention": False}, "off.yaml"))
    assert off.attn_implementation is None
    result = run_host("validate", write_config({**cfg, "attn_implementation": "sdpa"}, "clash.yaml"))
    assert result.exit_code == 2 and "flash_attention: true means attn_implementation: flash_attention_2" in result.output
    assert json.loads(json.dumps(resolved.model_dump(mode="json")))["attn_implementation"] == "flash_attention_2"
