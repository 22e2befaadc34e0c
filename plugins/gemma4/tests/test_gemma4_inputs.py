"""Text-only batches (fix 4) and packed sequences (fix 6)."""

import pytest
import torch

from host_plugin_gemma4 import inputs, tiny


def _model(multimodal, impl="sdpa", seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny.multimodal_config(256) if multimodal else tiny.text_config(256, kv_shared=2, sliding_window=4)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=impl)


# --- fix 4: mm_token_type_ids ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gemma4_text_only_batch_on_unpatched_model_matches_the_gate(mode):
    """Run the unpatched multimodal Gemma 4 on a text-only batch. The installed transformers either
    refuses it (then the plugin's gate must be on) or accepts it (then the gate must be off)."""
    m = _model(True)
    m.train(mode == "train")
    ids = torch.randint(3, 250, (2, 12))
    try:
        out = m(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        refused = False
        assert torch.isfinite(out.loss)
    except (ValueError, TypeError) as exc:
        refused = "mm_token_type_ids" in str(exc)
        if not refused:
            raise
    assert inputs.needs_mm_token_type_ids() == refused


def test_gemma4_gate_reads_a_raising_check():
    """The source probe recognises the check the seed's transformers had."""
    import re

    src = 'if mm_token_type_ids is None and self.training:\n    raise ValueError("`mm_token_type_ids` is required as a model input when training")'
    assert re.search(r"raise\s+\w+\((?:[^()]|\([^()]*\))*mm_token_type_ids", src)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gemma4_zeros_injected_for_text_only_batches(mode):
    m = _model(True)
    m.train(mode == "train")
    h = inputs.install(m, mm_token_type_ids=True, packing=False)
    seen = []  # observer registered after the plugin's hook, so it sees what the model gets
    m.model.register_forward_pre_hook(lambda mod, a, kw: seen.append(kw.get("mm_token_type_ids")), with_kwargs=True)
    ids = torch.randint(3, 250, (2, 12))
    with torch.set_grad_enabled(mode == "train"):
        out = m(input_ids=ids, labels=ids)
    h.remove()
    assert seen[-1] is not None and seen[-1].shape == ids.shape and not seen[-1].any()
    with torch.no_grad():
        ref = m(input_ids=ids, labels=ids, mm_token_type_ids=torch.zeros_like(ids))
    torch.testing.assert_close(out.logits.detach(), ref.logits)


def test_gemma4_multimodal_batches_untouched():
    hook = inputs.make_hook(mm_token_type_ids=True, packing=True)
    ids = torch.randint(3, 250, (1, 8))
    given = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 0]])
    assert hook(None, (), {"input_ids": ids, "mm_token_type_ids": given}) is None
    assert hook(None, (), {"input_ids": ids, "pixel_values": torch.zeros(1, 3, 16, 16)}) is None


# --- fix 6: packed sequences ------------------------------------------------------------------


def _packed(lengths=(9, 7), seed=1):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(3, 250, (1, n), generator=g) for n in lengths]
    ids = torch.cat(docs, dim=1)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    return docs, ids, pos


def _logits(m, **kw):
    with torch.no_grad():
        return m(**kw).logits


@pytest.mark.parametrize("multimodal", [False, True], ids=["causal_lm", "conditional_generation"])
def test_gemma4_packed_docs_attend_only_within_their_document(multimodal):
    m = _model(multimodal).eval()
    docs, ids, pos = _packed()
    unpacked = torch.cat([_logits(m, input_ids=d) for d in docs], dim=1)
    ones = torch.ones_like(ids)
    # unpatched, with the all-ones mask a padding collator sends: document 2 sees document 1
    bad = _logits(m, input_ids=ids, attention_mask=ones, position_ids=pos)
    assert not torch.allclose(bad[:, 9:], unpacked[:, 9:], atol=1e-3), "bug not reproduced"
    torch.testing.assert_close(bad[:, :9], unpacked[:, :9], rtol=1e-4, atol=1e-4)
    h = inputs.install(m, mm_token_type_ids=False, packing=True)
    good = _logits(m, input_ids=ids, attention_mask=ones, position_ids=pos)
    h.remove()
    torch.testing.assert_close(good, unpacked, rtol=1e-4, atol=1e-4)


def test_gemma4_packed_with_right_padding_and_eager():
    m = _model(False, impl="eager").eval()
    docs, ids, pos = _packed((6, 8))
    unpacked = torch.cat([_logits(m, input_ids=d) for d in docs], dim=1)
    pad = 3
    ids_p = torch.cat([ids, torch.zeros(1, pad, dtype=ids.dtype)], 1)
    pos_p = torch.cat([pos, torch.arange(14, 14 + pad).unsqueeze(0)], 1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(1, pad, dtype=ids.dtype)], 1)
    h = inputs.install(m, mm_token_type_ids=False, packing=True)
    good = _logits(m, input_ids=ids_p, attention_mask=mask, position_ids=pos_p)
    h.remove()
    torch.testing.assert_close(good[:, :14], unpacked, rtol=1e-4, atol=1e-4)


def test_gemma4_unpacked_batches_untouched():
    hook = inputs.make_hook(mm_token_type_ids=False, packing=True)
    ids = torch.randint(3, 250, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    assert hook(None, (), {"input_ids": ids, "attention_mask": mask, "position_ids": torch.arange(6).expand(2, 6)}) is None
    assert hook(None, (), {"input_ids": ids, "attention_mask": mask}) is None
