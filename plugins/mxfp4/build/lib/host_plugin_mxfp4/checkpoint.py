"""Write checkpoints in the gpt-oss MXFP4 layout (for tests, the bench and users converting models).

gpt-oss ships its experts as ``<prefix>.experts.gate_up_proj_blocks`` uint8 ``[E, N, K/32, 16]``
and ``..._scales`` uint8 ``[E, N, K/32]`` (N = output features, K = input features; E8M0 scales)
plus the bf16 biases, with ``quantization_config = {"quant_method": "mxfp4", ...}`` in config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from host_plugin_mxfp4.formats import FP4Weights

QUANT_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
}


def _save_shards(tensors: dict, out: Path, shard_name: str, index: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / shard_name), metadata={"format": "pt"})
    for k in tensors:
        index[k] = shard_name


def _write_config(config, out: Path, index: dict, total_size: int) -> None:
    config.save_pretrained(str(out))
    cfg_path = out / "config.json"
    data = json.loads(cfg_path.read_text())
    data["quantization_config"] = dict(QUANT_CONFIG)
    cfg_path.write_text(json.dumps(data, indent=2))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_size}, "weight_map": index}, indent=2)
    )


def save_gpt_oss_mxfp4(model, out: str | Path) -> Path:
    """Save a (bf16/fp32) transformers gpt-oss model with its experts MXFP4-quantized, gpt-oss style."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors, total = {}, 0
    for name, t in model.state_dict().items():
        stem, _, leaf = name.rpartition(".")
        if leaf in ("gate_up_proj", "down_proj") and t.dim() == 3:
            w = FP4Weights.quantize(t.transpose(1, 2), "mxfp4")  # transformers [E, in, out] -> [E, out, in]
            E, N, K = w.shape
            tensors[f"{name}_blocks"] = w.packed.reshape(E, N, K // 32, 16)
            tensors[f"{name}_scales"] = w.scales
        else:
            tensors[name] = t
    index: dict = {}
    _save_shards(tensors, out, "model-00001-of-00001.safetensors", index)
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    _write_config(model.config, out, index, total)
    return out


def write_random_gpt_oss_checkpoint(config, out: str | Path, seed: int = 0, dtype=torch.bfloat16) -> Path:
    """A random-weight checkpoint of ``config`` (a GptOssConfig) in the gpt-oss MXFP4 layout, written
    layer by layer (one shard per layer): never holds more than one layer in memory."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    H, I, E = config.hidden_size, config.intermediate_size, config.num_local_experts
    nh, nkv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    V = config.vocab_size

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    def fp4(n, k):
        blocks = torch.randint(0, 256, (E, n, k // 32, 16), generator=g, dtype=torch.uint8)
        # E8M0 scales around 2**-6 give weights of std ~0.05, like a trained model's experts
        scales = torch.randint(119, 123, (E, n, k // 32), generator=g, dtype=torch.uint8)
        return blocks, scales

    index: dict = {}
    total = 0
    first = {"model.embed_tokens.weight": rnd(V, H), "model.norm.weight": torch.ones(H, dtype=dtype), "lm_head.weight": rnd(V, H)}
    _save_shards(first, out, "model-embed.safetensors", index)
    total += sum(v.numel() * v.element_size() for v in first.values())
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        t = {
            f"{p}.input_layernorm.weight": torch.ones(H, dtype=dtype),
            f"{p}.post_attention_layernorm.weight": torch.ones(H, dtype=dtype),
            f"{p}.self_attn.q_proj.weight": rnd(nh * hd, H),
            f"{p}.self_attn.q_proj.bias": rnd(nh * hd),
            f"{p}.self_attn.k_proj.weight": rnd(nkv * hd, H),
            f"{p}.self_attn.k_proj.bias": rnd(nkv * hd),
            f"{p}.self_attn.v_proj.weight": rnd(nkv * hd, H),
            f"{p}.self_attn.v_proj.bias": rnd(nkv * hd),
            f"{p}.self_attn.o_proj.weight": rnd(H, nh * hd),
            f"{p}.self_attn.o_proj.bias": rnd(H),
            f"{p}.self_attn.sinks": rnd(nh),
            f"{p}.mlp.router.weight": rnd(E, H),
            f"{p}.mlp.router.bias": rnd(E),
            f"{p}.mlp.experts.gate_up_proj_bias": rnd(E, 2 * I),
            f"{p}.mlp.experts.down_proj_bias": rnd(E, H),
        }
        t[f"{p}.mlp.experts.gate_up_proj_blocks"], t[f"{p}.mlp.experts.gate_up_proj_scales"] = fp4(2 * I, H)
        t[f"{p}.mlp.experts.down_proj_blocks"], t[f"{p}.mlp.experts.down_proj_scales"] = fp4(H, I)
        _save_shards(t, out, f"model-layer{i:03d}.safetensors", index)
        total += sum(v.numel() * v.element_size() for v in t.values())
    _write_config(config, out, index, total)
    return out


def make_tiny_gpt_oss(out: str | Path) -> Path:
    """A ~3M-parameter random gpt-oss in the MXFP4 checkpoint layout plus a BPE tokenizer trained on
    examples/data/corpus.jsonl (when run from the repo) or stdlib docstrings."""
    from host.testing import build_tokenizer, sample_texts, tiny_config
    from transformers import AutoModelForCausalLM

    out = Path(out)
    corpus = Path("examples/data/corpus.jsonl")
    texts = [json.loads(line)["text"] for line in corpus.open()] if corpus.exists() else sample_texts()
    tok = build_tokenizer(texts, out, vocab_size=2048)
    cfg = tiny_config("gpt_oss", len(tok), hidden_size=128, intermediate_size=128, num_local_experts=8,
                      num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    cfg.eos_token_id = cfg.pad_token_id = tok.eos_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    save_gpt_oss_mxfp4(model, out)
    return out


if __name__ == "__main__":  # python -m host_plugin_mxfp4.checkpoint OUT_DIR
    import sys

    dest = Path(sys.argv[1] if len(sys.argv) > 1 else "examples/assets/tiny-gpt-oss-mxfp4")
    print(f"wrote {make_tiny_gpt_oss(dest)}" if not (dest / "config.json").exists() else f"{dest} exists; nothing to do")
