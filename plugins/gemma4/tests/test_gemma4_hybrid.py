"""Hybrid attention (issue 6, fix 2): global layers on SDPA, sliding layers on the configured implementation."""

import pytest
import torch

from host_plugin_gemma4 import hybrid, tiny


def _model(impl, multimodal=False):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny.multimodal_config(256) if multimodal else tiny.text_config(256, kv_shared=2)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 250, (2, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0  # right padding in row 1: masks must be right for both layer kinds
    return ids, mask


def _logits(m, ids, mask):
    with torch.no_grad():
        return m(input_ids=ids, attention_mask=mask).logits


def _global_impls(m):
    from host_plugin_gemma4 import model_utils

    return {l.self_attn.layer_type: l.self_attn.config._attn_implementation for l in model_utils.decoder_layers(m)}


@pytest.mark.parametrize("impl", ["eager", "flex_attention"])
@pytest.mark.parametrize("multimodal", [False, True], ids=["causal_lm", "conditional_generation"])
def test_gemma4_hybrid_equals_all_sdpa(impl, multimodal):
    ids, mask = _inputs()
    ref = _logits(_model("sdpa", multimodal), ids, mask)
    m = _model(impl, multimodal)
    assert hybrid.apply(m) == 2
    assert _global_impls(m) == {"sliding_attention": impl, "full_attention": "sdpa"}
    out = _logits(m, ids, mask)
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-4, atol=1e-4)
    hybrid.remove(m)


def test_gemma4_hybrid_needs_its_own_masks():
    """Without the per-layer-kind masks, SDPA global layers get the flex BlockMask and fail (or differ)."""
    ids, mask = _inputs()
    m = _model("flex_attention")
    hybrid.apply(m)
    sd = hybrid._HYBRID.pop(id(m.model.config))  # layer configs swapped, mask builders not told
    try:
        with pytest.raises(Exception):
            _logits(m, ids, mask)
    finally:
        hybrid._HYBRID[id(m.model.config)] = sd
    hybrid.remove(m)


def test_gemma4_hybrid_leaves_other_configs_alone():
    """A second, non-hybrid Gemma 4 in the same process still builds its masks from its own config."""
    ids, mask = _inputs()
    a = _model("flex_attention")
    hybrid.apply(a)
    b = _model("eager")
    ref = _logits(_model("sdpa"), ids, mask)
    valid = mask.bool()
    torch.testing.assert_close(_logits(b, ids, mask)[valid], ref[valid], rtol=1e-4, atol=1e-4)
    hybrid.remove(a)
