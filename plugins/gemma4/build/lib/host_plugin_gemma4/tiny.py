"""Tiny Gemma 4 configs for tests, examples and benchmarks (random weights, no downloads).

``host.testing.tiny_config`` cannot shrink Gemma 4 on transformers >= 5.2x (``head_dim`` became a
per-layer attribute that may not be read globally), so Gemma 4 configs are built from their
constructors here; both 5.17 and 5.23 accept these arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def text_config(vocab_size: int = 512, *, layers: int = 6, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                head_dim: int = 16, global_head_dim: int = 32, kv_shared: int = 3, moe: bool = False,
                per_layer_input: int = 16, sliding_window: int = 8, **overrides: Any):
    """Gemma4TextConfig: pattern (sliding, sliding, full) repeated, the last ``kv_shared`` layers reuse K/V."""
    from transformers import Gemma4TextConfig

    pattern = ["sliding_attention", "sliding_attention", "full_attention"]
    kw: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, global_head_dim=global_head_dim,
        layer_types=[pattern[i % 3] for i in range(layers)], sliding_window=sliding_window,
        hidden_size_per_layer_input=per_layer_input, vocab_size_per_layer_input=vocab_size,
        num_kv_shared_layers=kv_shared, max_position_embeddings=4096, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    if moe:
        kw.update(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=hidden // 2)
    kw.update(overrides)
    return Gemma4TextConfig(**kw)


def multimodal_config(vocab_size: int = 512, **text_kw: Any):
    """Gemma4Config (text + a 1-layer vision tower, no audio): loads as Gemma4ForConditionalGeneration."""
    from transformers import Gemma4Config
    from transformers.models.gemma4.configuration_gemma4 import Gemma4VisionConfig

    tc = text_config(vocab_size, **text_kw)
    vc = Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=2, head_dim=16)
    return Gemma4Config(text_config=tc.to_dict(), vision_config=vc.to_dict(), audio_config=None,
                        image_token_id=vocab_size - 1, pad_token_id=0, eos_token_id=1, bos_token_id=2)


def build(path: str | Path, tokenizer, *, multimodal: bool = False, seed: int = 0, **text_kw: Any) -> Path:
    """Save a random tiny Gemma 4 (causal LM, or conditional-generation when ``multimodal``) plus ``tokenizer``."""
    import torch
    from transformers import AutoModelForCausalLM

    vocab = len(tokenizer)
    cfg = multimodal_config(vocab, **text_kw) if multimodal else text_config(vocab, **text_kw)
    for attr in ("eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, attr)
        setattr(cfg, attr, value)
        if multimodal:
            setattr(cfg.text_config, attr, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return Path(path)
