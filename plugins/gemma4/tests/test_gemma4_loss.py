"""Logged loss under gradient accumulation (issue 6, fix 5), with a real HF Trainer."""

import pytest
import torch

from host_plugin_gemma4 import loss as loss_fix
from host_plugin_gemma4 import tiny

GA, MBS, ROWS, LEN = 4, 2, 8, 12


def _rows():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 250, (ROWS, LEN), generator=g)
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in ids]


def _collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _make(kind):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    if kind == "conditional_generation":
        return AutoModelForCausalLM.from_config(tiny.multimodal_config(256))
    m = AutoModelForCausalLM.from_config(tiny.text_config(256, kv_shared=2))
    if kind == "peft":
        from peft import LoraConfig, get_peft_model

        m = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    elif kind == "ignores_num_items":
        # the seed's Gemma 4: forward takes **kwargs but does not pass num_items_in_batch to its loss
        base = type(m)

        class IgnoresLossKwargs(base):
            def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
                return base.forward(self, input_ids=input_ids, attention_mask=attention_mask, labels=labels)

        m.__class__ = IgnoresLossKwargs
    return m


def _direct_mean_token_loss(model, rows):
    model.eval()
    with torch.no_grad():
        batch = _collate(rows)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out.logits[:, :-1].float()
        tgt = batch["labels"][:, 1:]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1)).item()


def _logged_first_loss(model, rows, tmp_path):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=MBS, gradient_accumulation_steps=GA, max_steps=1,
        logging_steps=1, learning_rate=1e-3, report_to="none", use_cpu=True, save_strategy="no",
        remove_unused_columns=False, dataloader_num_workers=0, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=_collate)
    trainer.train()
    return next(h["loss"] for h in trainer.state.log_history if "loss" in h)


@pytest.mark.parametrize("kind", ["causal_lm", "conditional_generation", "peft", "ignores_num_items"])
@pytest.mark.parametrize("patched", [False, True], ids=["unpatched", "plugin"])
def test_gemma4_logged_loss_equals_direct_mean_token_loss(kind, patched, tmp_path):
    rows = _rows()
    model = _make(kind)
    want = _direct_mean_token_loss(model, rows)  # all 8 rows = the one optimizer step's 4 micro-batches
    changed = loss_fix.fix(model) if patched else False
    got = _logged_first_loss(model, rows, tmp_path)
    if kind == "ignores_num_items" and not patched:
        assert got == pytest.approx(GA * want, rel=2e-3), "inflation by GA not reproduced"
        return
    assert got == pytest.approx(want, rel=2e-3)
    # the fix acts only where the probe shows the bug (not on this transformers' own forwards)
    assert changed == (kind == "ignores_num_items")
