"""Sample packing: the packer, the packed collator's isolation of documents, completion under packing,
and `host train` with sample_packing (one process and DDP)."""

import json
import os
import random
import types

import pytest
import torch

from host.errors import ConfigError, DataError
from host.packing import first_fit_decreasing, pack, packed_collator, prepare_model
from host.testing import base_config, sample_texts, tiny_config, write_jsonl


def _cfg(**kw):
    return types.SimpleNamespace(**{"sequence_len": 64, "seed": 0, **kw})


def _lognormal(n, seed=0, median=30, cap=64):
    rng = random.Random(seed)
    return [max(1, min(cap, int(rng.lognormvariate(0, 0.9) * median))) for _ in range(n)]


def test_first_fit_decreasing_fills_bins_within_capacity_deterministically():
    lengths = _lognormal(500)
    bins = first_fit_decreasing(lengths, 64, seed=3)
    assert sorted(i for b in bins for i in b) == list(range(500))  # every row exactly once
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert sum(lengths) / (64 * len(bins)) > 0.95  # FFD leaves little room on a long-tailed set
    assert bins == first_fit_decreasing(lengths, 64, seed=3)
    other = first_fit_decreasing(lengths, 64, seed=4)
    assert other != bins and sorted(map(sorted, other)) == sorted(map(sorted, bins))  # same bins, order by seed
    with pytest.raises(DataError, match="row 1 has 65 tokens"):
        first_fit_decreasing([3, 65], 64, seed=0)


def _docs(tokenizer, n=7, seed=0):
    """Tokenized documents of different lengths; some with a masked prompt, like chat rows."""
    import datasets

    rng = random.Random(seed)
    rows = []
    for text in sample_texts()[:n]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: rng.randint(5, 40)]
        cut = rng.choice([0, 0, len(ids) // 3])
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * cut + ids[cut:]})
    return datasets.Dataset.from_list(rows)


def _model(model_type, tokenizer, attn="sdpa"):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(model_type, len(tokenizer))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)
    prepare_model(model)  # what host train does under packing: no KV cache, so transformers sees the packing
    return model.eval()


MODELS = ["qwen3_moe", "qwen3"]


FLEX = pytest.param("flex_attention", marks=pytest.mark.skipif(
    not os.environ.get("HOST_TEST_FLEX"), reason="compiles for ~5 min on 2 CPU cores; HOST_TEST_FLEX=1 runs it"))


@pytest.mark.parametrize("attn", ["sdpa", "eager", FLEX])
@pytest.mark.parametrize("model_type", MODELS)
def test_packed_loss_equals_token_weighted_unpacked_loss(tiny_tokenizer, model_type, attn):
    docs = _docs(tiny_tokenizer)
    bins, stats = pack(docs, _cfg())
    assert stats.bins < len(docs) and len(bins) == stats.bins  # documents really share bins
    model = _model(model_type, tiny_tokenizer, attn)
    batch = packed_collator(tiny_tokenizer)([bins[i] for i in range(len(bins))])
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = model(**batch).loss.item()
        total, count = 0.0, 0
        for row in docs:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            n = int((labels[0, 1:] != -100).sum())
            if n:
                total += model(input_ids=ids, labels=labels).loss.item() * n
                count += n
    assert abs(packed - total / count) <= 1e-4


@pytest.mark.parametrize("model_type", MODELS)
def test_perturbing_one_document_leaves_the_others_unchanged(tiny_tokenizer, model_type):
    docs = _docs(tiny_tokenizer)
    bins, _ = pack(docs, _cfg(sequence_len=128))
    row = max((bins[i] for i in range(len(bins))), key=lambda r: r["position_ids"].count(0))
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
    assert len(starts) >= 4  # at least three documents in the bin
    model = _model(model_type, tiny_tokenizer)
    collate = packed_collator(tiny_tokenizer, pad_to=128)
    changed = dict(row, input_ids=list(row["input_ids"]))
    a, b = starts[1], starts[2]  # the second document
    changed["input_ids"][a:b] = [(t + 7) % len(tiny_tokenizer) for t in changed["input_ids"][a:b]]
    with torch.no_grad():
        before = model(**collate([row])).logits[0]
        after = model(**collate([changed])).logits[0]
    keep = torch.ones(128, dtype=torch.bool)
    keep[a:b] = False
    assert torch.allclose(before[keep], after[keep], atol=1e-5)  # the other documents, and the padding
    assert not torch.allclose(before[a:b], after[a:b], atol=1e-3)


def test_flattened_batch_gives_flash_attention_the_document_boundaries(tiny_tokenizer):
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    docs = _docs(tiny_tokenizer)
    bins, _ = pack(docs, _cfg())
    rows = [bins[i] for i in range(3)]
    batch = packed_collator(tiny_tokenizer, flatten=True)(rows)
    assert batch["input_ids"].shape[0] == 1 and batch["input_ids"].shape[1] == sum(len(r["input_ids"]) for r in rows)
    (cu, _), _ = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    lengths = [n for r in rows for n in _segments(r["position_ids"])]
    assert cu.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    starts = cu[:-1]
    assert (batch["labels"][0, starts] == -100).all()  # no document's first token is predicted from another


def _segments(pos):
    out = []
    for p in pos:
        if p == 0:
            out.append(0)
        out[-1] += 1
    return out


def test_streaming_and_unpackable_columns_are_refused(tiny_tokenizer):
    import datasets

    docs = _docs(tiny_tokenizer)
    with pytest.raises(ConfigError, match="streamed"):
        pack(docs.to_iterable_dataset(), _cfg())
    with pytest.raises(ConfigError, match=r"column\(s\) \['pixel_values'\]"):
        pack(docs.add_column("pixel_values", [[0.0]] * len(docs)), _cfg())
    assert isinstance(docs, datasets.Dataset)


def test_completion_keeps_documents_apart_under_packing(tiny_tokenizer, make_plugin_manager, tmp_path):
    from host.config import validate
    from host.data import prepare

    texts = sample_texts()[:20]
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    pm = make_plugin_manager([])
    raw = {"base_model": "x", "datasets": [{"path": str(data), "type": "completion"}], "sequence_len": 64}
    eos = tiny_tokenizer.eos_token_id
    docs = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
    packed_rows, _ = prepare(validate({**raw, "sample_packing": True}, pm), pm, tiny_tokenizer)
    # one row per document, a long one split into sequence_len pieces: nothing dropped, nothing merged
    assert [r for r in packed_rows["input_ids"]] == [d[i : i + 64] for d in docs for i in range(0, len(d), 64)]
    plain, _ = prepare(validate(raw, pm), pm, tiny_tokenizer)
    assert all(len(r) == 64 for r in plain["input_ids"])  # without packing: today's joined blocks
    bins, stats = pack(packed_rows, _cfg())
    assert stats.tokens == sum(map(len, docs)) and stats.efficiency > 0.9


def _chat_file(path, n=40):
    rng = random.Random(0)
    texts = sample_texts()
    rows = []
    for i in range(n):
        q, a = rng.choice(texts)[: rng.randint(20, 120)], rng.choice(texts)[: rng.randint(20, 200)]
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return write_jsonl(path, rows)


def _text_file(path, n=30):
    return write_jsonl(path, [{"text": t} for t in sample_texts()[:n]])


@pytest.mark.parametrize("dtype", ["completion", "chat_template"])
def test_host_train_with_sample_packing(dtype, write_config, tiny_model, run_host, tmp_path):
    data = _text_file(tmp_path / "text.jsonl") if dtype == "completion" else _chat_file(tmp_path / "chat.jsonl")
    out = tmp_path / "out"
    cfg = base_config(tiny_model("qwen3_moe"), data, out, sample_packing=True, sequence_len=128, val_set_size=0.1,
                      max_steps=3, datasets=[{"path": str(data), "type": dtype}])
    result = run_host("train", write_config(cfg))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "run_summary.json").read_text())
    train, ev = summary["packing"]["train"], summary["packing"]["eval"]  # eval follows sample_packing
    assert train["bins"] < train["rows"] and summary["packing_efficiency"] == train["efficiency"] > 0.8
    assert ev["bins"] <= ev["rows"]
    assert summary["steps"] == 3 and summary["final_eval_loss"] is not None
    # the Trainer counted the non-pad tokens of whole bins: about 2 bins x 128 tokens x efficiency per step
    assert 3 * 2 * 128 * 0.6 < summary["tokens"] <= 3 * 2 * 128


def test_eval_sample_packing_false_keeps_eval_rows_unpacked(write_config, tiny_model, run_host, tmp_path):
    out = tmp_path / "out"
    cfg = base_config(tiny_model("qwen3_moe"), _text_file(tmp_path / "text.jsonl"), out, sample_packing=True, eval_sample_packing=False,
                      val_set_size=0.1, max_steps=2)
    result = run_host("train", write_config(cfg))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "run_summary.json").read_text())
    assert list(summary["packing"]) == ["train"] and summary["final_eval_loss"] is not None


@pytest.mark.slow
def test_ddp_ranks_get_whole_bins_and_equal_steps(write_config, tiny_model, tmp_path, local_plugin):
    """Two gloo ranks: bins are the sampler's rows (so ranks get whole bins) and both take the same number of steps."""
    import subprocess
    import sys

    from host.testing import offline_env

    site = local_plugin("probe", """
        import json, os
        from host import hookimpl
        from transformers import TrainerCallback

        class Probe(TrainerCallback):
            steps = 0
            def on_step_end(self, args, state, control, **kw):
                Probe.steps += 1
            def on_train_end(self, args, state, control, **kw):
                rank = os.environ.get("RANK", "0")
                with open(os.path.join(args.output_dir, f"probe-{rank}.json"), "w") as f:
                    json.dump({"steps": Probe.steps}, f)

        @hookimpl
        def trainer_callbacks(cfg):
            return [Probe()]
    """)
    out = tmp_path / "out"
    data = _text_file(tmp_path / "text.jsonl", n=12)
    cfg = write_config(base_config(tiny_model("qwen3_moe"), data, out, sample_packing=True, num_epochs=1,
                                   max_steps=None, sequence_len=128, plugins=["probe"]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=29611",
           "-m", "host", "train", str(cfg)]
    env = offline_env(OMP_NUM_THREADS="1", PYTHONPATH=str(site))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((out / "run_summary.json").read_text())
    bins = summary["packing"]["train"]["bins"]
    steps = [json.loads((out / f"probe-{r}.json").read_text())["steps"] for r in (0, 1)]
    assert steps[0] == steps[1] == summary["steps"] == -(-bins // (2 * 2))  # whole bins, split evenly over 2 ranks
