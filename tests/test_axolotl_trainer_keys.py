"""axolotl's trainer/data keys: exact deduplication, optim_args, activation offloading, N-D parallelism sizes."""

import logging

import pytest

from host.config import validate
from host.data import prepare
from host.testing import write_jsonl


def _prepare(make_plugin_manager, tokenizer, **cfg):
    pm = make_plugin_manager([])
    return prepare(validate({"base_model": "unused", **cfg}, pm), pm, tokenizer)


# --- dataset_exact_deduplication --------------------------------------------------------------

def _chats(n):
    return [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]}
            for i in range(n)]


def test_exact_deduplication_drops_repeats_within_and_across_train_and_eval(make_plugin_manager, tiny_tokenizer, tmp_path, caplog):
    rows = _chats(12)
    a = write_jsonl(tmp_path / "a.jsonl", rows + rows[:4] + rows[:2])  # 6 repeats within one file
    b = write_jsonl(tmp_path / "b.jsonl", rows[5:9])  # 4 repeats across entries
    entries = [{"path": str(a), "type": "chat_template"}, {"path": str(b), "type": "chat_template"}]
    kwargs = dict(sequence_len=64, val_set_size=0.25, datasets=entries, seed=3)
    train, ev = _prepare(make_plugin_manager, tiny_tokenizer, **kwargs)
    assert len(train) + len(ev) == 22  # without the key every copy stays
    with caplog.at_level(logging.INFO, logger="host.data"):
        train, ev = _prepare(make_plugin_manager, tiny_tokenizer, dataset_exact_deduplication=True, **kwargs)
    assert len(train) + len(ev) == 12
    seen = [tuple(r) for r in train["input_ids"]] + [tuple(r) for r in ev["input_ids"]]
    assert len(set(seen)) == len(seen)  # nothing repeats within train, within eval or between them
    assert "dataset_exact_deduplication: dropped 10 of 22 datasets row(s)" in caplog.text


def test_exact_deduplication_keys_the_prepared_cache(make_plugin_manager, tiny_tokenizer, tmp_path):
    rows = _chats(4)
    f = write_jsonl(tmp_path / "a.jsonl", rows + rows)
    kwargs = dict(sequence_len=64, datasets=[{"path": str(f), "type": "chat_template"}], dataset_prepared_path=str(tmp_path / "prep"))
    assert len(_prepare(make_plugin_manager, tiny_tokenizer, **kwargs)[0]) == 8
    assert len(_prepare(make_plugin_manager, tiny_tokenizer, dataset_exact_deduplication=True, **kwargs)[0]) == 4
    assert len(_prepare(make_plugin_manager, tiny_tokenizer, **kwargs)[0]) == 8  # its own cache entry, not the deduplicated one
    assert len(list((tmp_path / "prep").iterdir())) == 2


def test_exact_deduplication_compares_every_column():
    """Same tokens with other labels (or another extra column) is another row, as in axolotl (whole rows)."""
    import datasets

    from host.dedup import deduplicate

    ds = datasets.Dataset.from_dict({
        "input_ids": [[1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3]],
        "labels": [[-100, 2, 3], [-100, 2, 3], [1, 2, 3], [-100, 2, 3]],
        "source": ["a", "a", "a", "b"],
    })
    out = deduplicate(ds)
    assert out["labels"] == [[-100, 2, 3], [1, 2, 3], [-100, 2, 3]] and out["source"] == ["a", "a", "b"]


# --- optim_args -----------------------------------------------------------------------------------


def _train_cfg(tiny_model, text_file, out, **overrides):
    from host.testing import base_config

    return base_config(tiny_model("qwen3"), text_file, out, **overrides)


@pytest.mark.parametrize("optim_args", [{"momentum": 0.9, "nesterov": True}, "momentum=0.9, nesterov=true"])
def test_optim_args_reach_the_optimizer(run_host, write_config, tiny_model, text_file, tmp_path, optim_args):
    """axolotl's mapping and transformers' k=v string both end up in the real optimizer of a Trainer run."""
    import torch

    out = tmp_path / "out"
    cfg = _train_cfg(tiny_model, text_file, out, optimizer="sgd", optim_args=optim_args, max_steps=2, learning_rate=1e-2)
    result = run_host("train", write_config(cfg))
    assert result.exit_code == 0, result.output
    saved = torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=True)
    group = saved["param_groups"][0]
    assert group["momentum"] == 0.9 and group["nesterov"] is True
    assert all("momentum_buffer" in s for s in saved["state"].values())
    assert "did not reach the optimizer" not in result.output


def test_optim_args_an_optimizer_does_not_read_is_named(run_host, write_config, tiny_model, text_file, tmp_path, caplog):
    cfg = _train_cfg(tiny_model, text_file, tmp_path / "out", optimizer="adamw_torch", optim_args={"momentum": 0.9},
                     max_steps=1, save_strategy="no")
    with caplog.at_level(logging.WARNING, logger="host.train"):
        assert run_host("train", write_config(cfg)).exit_code == 0
    assert "optim_args: momentum did not reach the optimizer (AdamW, optimizer: adamw_torch)" in caplog.text


@pytest.mark.parametrize("value, message", [
    ("momentum", "optim_args: 'momentum' is not key=value"),
    ({"betas": [0.9, 0.99]}, "optim_args: betas: [0.9, 0.99] is not a single value"),
    ({"note": "a,b"}, "optim_args: note: 'a,b' holds ','"),
])
def test_bad_optim_args_name_the_key(run_host, write_config, tmp_path, value, message):
    from host.testing import base_config

    result = run_host("validate", write_config(base_config("m", "d.jsonl", tmp_path / "o", optimizer="sgd", optim_args=value)))
    assert result.exit_code == 2 and message in result.output, result.output


def test_torchao_8bit_adamw_gets_bf16_stochastic_round(tiny_model, text_file, tmp_path, make_plugin_manager):
    """gemma4's 31b configs: adamw_torch_8bit with optim_args {bf16_stochastic_round: true} (torchao's AdamW8bit)."""
    pytest.importorskip("torchao")
    from transformers import AutoModelForCausalLM, Trainer

    from host.train import training_arguments

    cfg = validate(_train_cfg(tiny_model, text_file, tmp_path / "o", optimizer="adamw_torch_8bit",
                              optim_args={"bf16_stochastic_round": True}), make_plugin_manager([]))
    model = AutoModelForCausalLM.from_pretrained(tiny_model("qwen3"))
    trainer = Trainer(model=model, args=training_arguments(cfg, has_eval=False))
    opt = trainer.create_optimizer()
    assert type(opt).__name__ == "AdamW8bit" and bool(opt.bf16_stochastic_round) is True


# --- activation offloading ------------------------------------------------------------------------


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_offloading_moves_saved_tensors_and_keeps_the_math(tiny_model, reentrant):
    """Under gradient checkpointing (both of torch's kinds) each layer's input goes through the CPU copy,
    and loss and every gradient equal the run without offloading, bit for bit."""
    import torch
    from transformers import AutoModelForCausalLM

    from host.offload import attach

    def run(offload: bool):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model("qwen3"), dtype=torch.float32)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.enable_input_require_grads()
        model.train()
        off = attach(model) if offload else None
        seen = []
        if off is not None:
            pack = off.pack
            off._hooks.pack_hook = lambda t: seen.append(tuple(t.shape)) or pack(t)
        ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        with torch.no_grad():  # eval forwards save nothing
            model(input_ids=ids)
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, off, seen

    loss0, grads0, _, _ = run(False)
    loss1, grads1, off, seen = run(True)
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys() and all(torch.equal(grads0[k], grads1[k]) for k in grads0)
    layers = 2  # host.testing.TINY_DIMS
    hidden = (2, 24, 64)
    assert off.offloaded >= layers and seen.count(hidden) >= layers  # each checkpointed layer's input went to CPU
    assert off.offloaded_bytes >= layers * 2 * 24 * 64 * 4
    assert off.kept > 0  # the weights stayed where they are



@pytest.mark.parametrize("keys", [{"gradient_checkpointing": True, "activation_offloading": True},
                                  {"gradient_checkpointing": "offload"}])
def test_activation_offloading_in_a_training_run(run_host, write_config, tiny_model, text_file, tmp_path, caplog, keys):
    import re

    cfg = _train_cfg(tiny_model, text_file, tmp_path / "out", max_steps=2, save_strategy="no", **keys)
    with caplog.at_level(logging.INFO, logger="host.train"):
        result = run_host("train", write_config(cfg))
    assert result.exit_code == 0, result.output
    moved = re.search(r"activation_offloading: step 1 moved (\d+) saved tensors \(([\d.]+) MiB\)", caplog.text)
    assert moved and int(moved.group(1)) >= 2, caplog.text


@pytest.mark.parametrize("keys, message", [
    ({"activation_offloading": True}, "activation_offloading: needs gradient_checkpointing: true"),
    ({"gradient_checkpointing": True, "activation_offloading": "disk"}, "activation_offloading: disk: offloading activations to disk is not in host"),
    ({"gradient_checkpointing": "offload_disk"}, "gradient_checkpointing: offload_disk: offloading activations to disk is not in host"),
])
def test_activation_offloading_rules(run_host, write_config, tmp_path, keys, message):
    from host.testing import base_config

    result = run_host("validate", write_config(base_config("m", "d.jsonl", tmp_path / "o", **keys)))
    assert result.exit_code == 2 and message in result.output, result.output


# --- sample_packing_sequentially, curriculum_sampling ------------------------------------------


def test_next_fit_keeps_data_order():
    from host.packing import first_fit_decreasing, next_fit

    lengths = [5, 3, 8, 2, 2, 7, 1]
    assert next_fit(lengths, 10) == [[0, 1], [2, 3], [4, 5, 6]]
    assert [i for b in next_fit(lengths, 10) for i in b] == list(range(7))
    assert [i for b in first_fit_decreasing(lengths, 10, seed=0) for i in b] != list(range(7))


@pytest.mark.parametrize("curriculum", [True, False])
def test_curriculum_sampling_trains_in_data_order(tiny_model, tiny_tokenizer, tmp_path, make_plugin_manager, curriculum):
    """The Trainer's dataloader deals the sequentially packed bins out in file order (and a shuffled
    order without curriculum_sampling); the eval split takes the last rows instead of random ones."""
    from transformers import AutoModelForCausalLM, Trainer

    from host.train import make_collator, pack_for_training, training_arguments

    rows = _chats(40)
    f = write_jsonl(tmp_path / "c.jsonl", rows)
    cfg = validate({"base_model": str(tiny_model("qwen3")), "datasets": [{"path": str(f), "type": "chat_template"}],
                    "sequence_len": 64, "sample_packing": True, "sample_packing_sequentially": True, "eval_sample_packing": False,
                    "curriculum_sampling": curriculum, "val_set_size": 0.1, "micro_batch_size": 1, "output_dir": str(tmp_path / "o")},
                   make_plugin_manager([]))
    pm = make_plugin_manager([])
    train_ds, eval_ds = prepare(cfg, pm, tiny_tokenizer)
    def number(ids):
        return int(tiny_tokenizer.decode(ids).split("Question ")[1].split("?")[0])

    assert ([number(r) for r in eval_ds["input_ids"]] == [36, 37, 38, 39]) is curriculum  # the last rows, in order
    train_ds, _, stats = pack_for_training(cfg, train_ds, eval_ds)
    model = AutoModelForCausalLM.from_pretrained(tiny_model("qwen3"))
    trainer = Trainer(model=model, args=training_arguments(cfg, has_eval=False), train_dataset=train_ds,
                      data_collator=make_collator(cfg, pm, tiny_tokenizer, None, model))
    seen = [b["input_ids"][0] for b in trainer.get_train_dataloader()]
    firsts = [number(ids) for ids in seen]
    assert (firsts == sorted(firsts)) is curriculum
    assert stats["train"]["bins"] == len(seen)


# --- table entries ----------------------------------------------------------------------------------


def test_speed_and_export_switches_are_one_warning_each(run_host, write_config, tmp_path):
    """gpt-oss's configs set use_kernels without axolotl's KernelsPlugin: a warning pointing at scattermoe."""
    from host.testing import base_config

    cfg = base_config("m", "d.jsonl", tmp_path / "o", use_kernels=True, fused_attn_kernel=True, use_otel_metrics=True,
                      otel_metrics_port=9100)
    result = run_host("validate", write_config(cfg))
    assert "use_kernels" in result.output and "add plugins: [scattermoe]" in result.output, result.output
    for key in ("use_kernels", "fused_attn_kernel", "use_otel_metrics", "otel_metrics_port"):
        assert f"{key}: ignored (" in result.output
        assert f"axolotl key `{key}`" not in result.output  # not an error


# --- dp_shard_size / dp_replicate_size -----------------------------------------------------------


@pytest.mark.parametrize("keys, message", [
    ({"dp_shard_size": 2}, "dp_shard_size: sharding needs FSDP (as in axolotl)"),
    ({"dp_shard_size": 2, "dp_replicate_size": 2, "fsdp_version": 2, "fsdp_config": {"offload_params": False}},
     "dp_replicate_size: replicas of FSDP shard groups (hybrid sharding) are not in host"),
    ({"dp_shard_size": 0, "fsdp_config": {}}, "key 'dp_shard_size': Input should be greater than 0"),
])
def test_parallel_sizes_host_cannot_do_are_refused(run_host, write_config, tmp_path, keys, message):
    from host.testing import base_config

    result = run_host("validate", write_config(base_config("m", "d.jsonl", tmp_path / "o", **keys)))
    assert result.exit_code == 2 and message in result.output, result.output


def test_dp_shard_size_of_the_world_size_is_plain_fsdp(make_plugin_manager):
    from host.errors import ConfigError
    from host.parallel_sizes import check_world

    cfg = validate({"base_model": "m", "dp_shard_size": 16, "fsdp_version": 2, "fsdp_config": {"offload_params": True}},
                   make_plugin_manager([]))
    check_world(cfg, world=16)  # gpt-oss-120b's 2 x 8 GPUs: FSDP over all 16 ranks
    with pytest.raises(ConfigError, match=r"dp_shard_size: 16, but this launch has 8 process\(es\); host shards over every rank"):
        check_world(cfg, world=8)


def test_dp_replicate_size_the_launch_cannot_satisfy_stops_training_before_loading(run_host, write_config, tiny_model, text_file, tmp_path):
    result = run_host("train", write_config(_train_cfg(tiny_model, text_file, tmp_path / "o", dp_replicate_size=2)))
    assert result.exit_code == 2
    assert "dp_replicate_size: 2, but this launch has 1 process(es); host replicates over every rank" in result.output


def test_an_optimizer_whose_package_is_missing_warns_at_validate_and_stops_train(run_host, write_config, tiny_model, text_file,
                                                                                 tmp_path, monkeypatch):
    """validate may run where training will not: a warning there; train stops before anything loads."""
    from host import optim_args

    # a real transformers optimizer name, pointed at a package no machine has
    monkeypatch.setitem(optim_args.PACKAGES, "adamw_torch_8bit", ("host_no_such_package", "host-no-such-package"))
    path = write_config(_train_cfg(tiny_model, text_file, tmp_path / "o", optimizer="adamw_torch_8bit"))
    result = run_host("validate", path)
    assert result.exit_code == 0, result.output
    assert "optimizer: adamw_torch_8bit needs the host_no_such_package package, which is not installed here" in result.output
    result = run_host("train", path)
    assert result.exit_code == 2 and "pip install host-no-such-package" in result.output
    assert not (tmp_path / "o").exists()
