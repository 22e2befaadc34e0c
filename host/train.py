"""The training phase: data, model, HF Trainer, then the run's artifacts."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

from host import checkpoints, data, offload, optim_args
from host import model as model_mod
from host.errors import ConfigError

log = logging.getLogger("host.train")


def pad_collator(tokenizer, pad_to: int | None = None):
    """Right-pad ``input_ids``/``attention_mask``/``labels`` (labels with -100)."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def collate(rows):
        width = pad_to or max(len(r["input_ids"]) for r in rows)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for r in rows:
            n = len(r["input_ids"])
            batch["input_ids"].append(list(r["input_ids"]) + [pad_id] * (width - n))
            batch["attention_mask"].append(list(r.get("attention_mask") or [1] * n) + [0] * (width - n))
            batch["labels"].append(list(r["labels"]) + [-100] * (width - n))
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}

    return collate


def _steps_ratio(per_epoch: int | None, num_epochs: float) -> float | None:
    """HF Trainer reads a float < 1 as a fraction of total steps."""
    return None if not per_epoch else min(1.0, 1.0 / (per_epoch * num_epochs))


def training_arguments(cfg, has_eval: bool):
    from transformers import TrainingArguments

    from host.parallel_sizes import check_world

    check_world(cfg)  # before anything loads
    optim_args.require_package(cfg)
    save_steps = cfg.save_steps or _steps_ratio(cfg.saves_per_epoch, cfg.num_epochs)
    eval_steps = cfg.eval_steps or _steps_ratio(cfg.evals_per_epoch, cfg.num_epochs)
    cuda = _cuda()
    kwargs = dict(
        use_cpu=not cuda,  # without it, torchrun on CPU runs N independent copies instead of gloo DDP
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.micro_batch_size,
        per_device_eval_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps if cfg.max_steps else -1,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps if cfg.warmup_steps is not None else (cfg.warmup_ratio or 0.0),
        optim=cfg.optimizer,
        weight_decay=cfg.weight_decay,
        bf16=model_mod.use_bf16(cfg),
        fp16=cfg.fp16,
        logging_steps=cfg.logging_steps,
        logging_nan_inf_filter=cfg.logging_nan_inf_filter,
        save_strategy=_save_strategy(cfg, save_steps),
        save_steps=save_steps or 500,
        save_total_limit=cfg.save_total_limit,
        eval_strategy=("steps" if eval_steps else "epoch") if has_eval else "no",
        eval_steps=eval_steps,
        seed=cfg.seed,
        data_seed=cfg.seed,
        torch_compile=cfg.torch_compile is True or (cfg.torch_compile == "auto" and cuda),
        torch_compile_mode=cfg.torch_compile_mode,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        ddp_find_unused_parameters=cfg.ddp_find_unused_parameters,
        ddp_bucket_cap_mb=cfg.ddp_bucket_cap_mb,
        ddp_broadcast_buffers=cfg.ddp_broadcast_buffers,
        ddp_timeout=cfg.ddp_timeout,
        **fsdp_arguments(cfg),
        **deepspeed_arguments(cfg, cuda),
        **logging_arguments(cfg),
    )
    if cfg.gradient_checkpointing and not cfg.fsdp_enabled:  # under FSDP it is fsdp_config.activation_checkpointing
        kwargs["gradient_checkpointing"] = True
        if cfg.gradient_checkpointing_kwargs is not None:
            kwargs["gradient_checkpointing_kwargs"] = cfg.gradient_checkpointing_kwargs
    kwargs.update(optional_training_arguments(cfg, cuda))
    kwargs.update(optim_args.training_argument(cfg))
    if cfg.curriculum_sampling:
        kwargs.update(sequential_sampling())
    try:
        return TrainingArguments(**kwargs)
    except ValueError as exc:  # e.g. an unknown optimizer or scheduler name; HF's message names the value
        raise ConfigError(f"training keys (optimizer, lr_scheduler, bf16/fp16, ...): {exc}") from None


def sequential_sampling() -> dict:
    """axolotl's ``curriculum_sampling``: the Trainer deals rows (or packed bins) out in data order."""
    from transformers import TrainingArguments

    if "train_sampling_strategy" not in TrainingArguments.__dataclass_fields__:
        raise ConfigError("curriculum_sampling: this transformers has no train_sampling_strategy; upgrade transformers or remove it.")
    return {"train_sampling_strategy": "sequential"}


def _save_strategy(cfg, save_steps) -> str:
    """axolotl's default: a checkpoint per epoch unless save keys say otherwise."""
    if cfg.save_strategy == "no":
        return "no"
    return "steps" if save_steps else "epoch"


def optional_training_arguments(cfg, cuda: bool) -> dict:
    """axolotl keys that map one-to-one onto TrainingArguments, passed only when set (the Trainer's
    defaults apply otherwise)."""
    out = {k: getattr(cfg, k) for k in ("max_grad_norm", "adam_beta1", "adam_beta2", "adam_epsilon") if getattr(cfg, k) is not None}
    if cuda and cfg.tf32 is not False:
        import torch

        supported = torch.cuda.get_device_capability()[0] >= 8
        if cfg.tf32 is True and not supported:
            raise ConfigError("tf32: this GPU has no TF32 (needs compute capability 8.0+); set tf32: false or auto.")
        out["tf32"] = supported
    return out


def fsdp_arguments(cfg) -> dict:
    """``fsdp``/``fsdp_config`` for TrainingArguments (the form both transformers 5.17 and 5.23 read)."""
    if not cfg.fsdp_enabled:
        return {}
    if not _cuda():
        raise ConfigError(
            "fsdp: FSDP needs CUDA GPUs; on CPU accelerate would silently run plain DDP instead. Remove "
            "fsdp/fsdp_config for CPU runs (DDP under torchrun works there)."
        )
    fc = fsdp_plugin_config(cfg)
    for name, value in fsdp_environment(fc).items():
        os.environ.setdefault(name, value)
    return {"fsdp": True, "fsdp_config": fc}


def fsdp_environment(fc: dict) -> dict[str, str]:
    """Variables accelerate reads before it creates the process group. With ``cpu_offload`` the
    parameters and gradients live on the CPU, so gradient clipping and the final gather run collectives
    on CPU tensors: they need the ``cuda:nccl,cpu:gloo`` backend, which accelerate picks only from these
    variables (transformers does not set them under torchrun; without them step 1 fails with "No
    backend type associated with device type cpu")."""
    if not fc.get("cpu_offload"):
        return {}
    return {"ACCELERATE_USE_FSDP": "true", "FSDP_OFFLOAD_PARAMS": "true"}


def fsdp_plugin_config(cfg) -> dict:
    """The accelerate ``fsdp_config`` for ``cfg`` (axolotl's names already read as host's)."""
    fc = cfg.fsdp_config.model_dump(exclude_none=True, exclude={"final_state_dict_type", "version"}) if cfg.fsdp_config else {}
    if cfg.gradient_checkpointing:  # axolotl's meaning under FSDP: checkpoint each wrapped layer
        fc["activation_checkpointing"] = True
    options = cfg.fsdp if isinstance(cfg.fsdp, list) else []
    if "offload" in options:
        fc["cpu_offload"] = True
    if "shard_grad_op" in options:
        fc["reshard_after_forward"] = False if cfg.fsdp_version == 2 else "shard_grad_op"
    fc["version"] = cfg.fsdp_version
    return fc


def deepspeed_arguments(cfg, cuda: bool) -> dict:
    """``deepspeed`` for TrainingArguments; the Trainer fills the JSON's "auto" values from the config."""
    if not cfg.deepspeed:
        return {}
    if not cuda:
        raise ConfigError("deepspeed: DeepSpeed needs CUDA GPUs; remove it for CPU runs (DDP under torchrun works there).")
    return {"deepspeed": cfg.deepspeed}


def logging_arguments(cfg) -> dict:
    """``report_to`` from axolotl's wandb_* and use_tensorboard keys (wandb through its env vars, run
    files under output_dir/wandb; TensorBoard event files under output_dir/runs, the Trainer's default)."""
    import os

    report = []
    if cfg.wandb_project and cfg.wandb_mode != "disabled":
        report.append("wandb")
        env = {"WANDB_PROJECT": cfg.wandb_project, "WANDB_DIR": cfg.output_dir,
               "WANDB_ENTITY": cfg.wandb_entity, "WANDB_MODE": cfg.wandb_mode}
        for key, value in env.items():  # set or cleared: a previous run in this process must not leak in
            if value:
                os.environ[key] = value
            else:
                os.environ.pop(key, None)
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    if cfg.use_tensorboard:
        report.append("tensorboard")
    out: dict = {"report_to": report or "none"}
    if cfg.wandb_name:
        out["run_name"] = cfg.wandb_name
    return out


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _callbacks(cfg, pm) -> list:
    from host.callbacks import EarlyStopping, GradNormLog, MarkComplete, StepTimer

    extra = [cb for cbs in pm.hook.trainer_callbacks(cfg=cfg) for cb in (cbs or [])]
    stop = [EarlyStopping(cfg.early_stopping_patience)] if cfg.early_stopping_patience else []
    check = [optim_args.check_callback(cfg)] if cfg.optim_args else []
    return [MarkComplete(), StepTimer(), GradNormLog(), *stop, *check, *extra]


def train(cfg, pm, warnings=()):
    """Run one training job end to end; returns the run summary dict."""
    import torch
    from transformers import Trainer, set_seed

    for w in warnings:
        log.warning(w)
    resume = checkpoints.resolve_resume(cfg)
    set_seed(cfg.seed)  # before the adapter exists: LoRA initialisation draws from the RNG
    args = training_arguments(cfg, has_eval=bool(cfg.val_set_size))
    if args.torch_compile:
        from host.precision import fix_mixed_matmul_precision

        fix_mixed_matmul_precision()
    tokenizer, processor = model_mod.load_tokenizer_phase(cfg, pm)
    with args.main_process_first(desc="dataset preparation"):  # rank 0 fills the cache, others read it
        train_ds, eval_ds = data.prepare(cfg, pm, tokenizer, processor)  # data errors before any weights load
    train_ds, eval_ds, packing_stats = pack_for_training(cfg, train_ds, eval_ds)
    model = model_mod.load_model_phase(cfg, pm, tokenizer)
    if not hasattr(train_ds, "__len__"):
        if not cfg.max_steps:
            raise ConfigError("max_steps: a streaming dataset has no length; set max_steps.")
        # each rank reads its own stream; dispatching from rank 0 would concatenate and re-slice
        # batches, which breaks on variable widths and per-sample extras such as pixel_values
        args.accelerator_config.dispatch_batches = False
    collate = make_collator(cfg, pm, tokenizer, processor, model)
    offloader = offload.attach(model) if offload.enabled(cfg) else None
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collate,
        processing_class=tokenizer,
        callbacks=_callbacks(cfg, pm) + ([offload.callback(offloader)] if offloader else []),
    )
    start = time.time()
    if resume and checkpoints.finished_at(resume, cfg.max_steps) is not None:
        result = _restore_finished(trainer, resume)  # killed during the final save: only that is left
    else:
        result = trainer.train(resume_from_checkpoint=resume)
    eval_metrics = trainer.evaluate() if eval_ds is not None else {}
    wall = time.time() - start
    if trainer.is_fsdp_enabled:  # the final model loads on one device: gather it, whatever checkpoints used
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(cfg.output_dir)
    summary = {}
    if trainer.is_world_process_zero():
        (processor or tokenizer).save_pretrained(cfg.output_dir)
        summary = write_summary(cfg, pm, trainer, result, eval_metrics, wall, packing_stats)
        plot_losses(trainer.state.log_history, Path(cfg.output_dir) / "loss.png")
    if "wandb" in args.report_to:  # flush and close the run now, not at interpreter exit
        import wandb

        if wandb.run is not None:
            wandb.finish()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return summary


def _restore_finished(trainer, checkpoint: str):
    """Load a checkpoint that already ends training (weights and state), without a training step:
    the Trainer would otherwise run one step past ``max_steps`` when resumed from it."""
    import os

    from transformers.trainer_callback import TrainerState
    from transformers.trainer_utils import TrainOutput

    log.info("%s already ends training; restoring it to write the final model", checkpoint)
    trainer._load_from_checkpoint(checkpoint)
    trainer.state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return TrainOutput(trainer.state.global_step, sum(losses) / len(losses) if losses else float("nan"), {})


def pack_for_training(cfg, train_ds, eval_ds):
    """Pack the splits that ``sample_packing`` / ``eval_sample_packing`` ask for; returns their stats."""
    from host import packing

    stats = {}
    if cfg.sample_packing:
        train_ds, s = packing.pack(train_ds, cfg, "train")
        stats["train"] = s.as_dict()
    if cfg.eval_packing and eval_ds is not None:
        eval_ds, s = packing.pack(eval_ds, cfg, "eval")
        stats["eval"] = s.as_dict()
    return train_ds, eval_ds, stats


def make_collator(cfg, pm, tokenizer, processor, model):
    """A plugin's collator, the packed collator when either split is packed, else the padding one."""
    from host import packing

    plugin_collate = pm.hook.collator(cfg=cfg, tokenizer=tokenizer, processor=processor)
    pad_to = cfg.sequence_len if cfg.pad_to_sequence_len else None
    if cfg.sample_packing or cfg.eval_packing:
        if plugin_collate is not None:
            raise ConfigError(
                "sample_packing: an enabled plugin supplies its own collator, which cannot batch packed rows; "
                "set sample_packing: false (and eval_sample_packing: false) or disable that plugin."
            )
        packing.prepare_model(model)
        flatten = packing.flattens(model)
        return packing.packed_collator(tokenizer, None if flatten else pad_to, flatten=flatten)
    return plugin_collate or pad_collator(tokenizer, pad_to)


def write_summary(cfg, pm, trainer, result, eval_metrics, wall, packing_stats=None) -> dict:
    from host import __version__
    from host.callbacks import StepTimer
    from host.plugins import plugin_versions

    timer = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, StepTimer))
    step_s, steady_s = timer.median_step_s(), timer.steady_step_s()
    history = trainer.state.log_history
    train_losses = [h["loss"] for h in history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    tokens = int(trainer.state.num_input_tokens_seen or 0)
    summary = {
        "config_hash": cfg.config_hash(),
        "host_version": __version__,
        "plugins": plugin_versions(pm),
        "steps": trainer.state.global_step,
        "tokens": tokens,
        "wall_time_s": round(wall, 3),
        "train_runtime_s": round(result.metrics.get("train_runtime", wall), 3),
        "tokens_per_s": round(tokens / max(result.metrics.get("train_runtime", wall), 1e-9), 1),
        "median_step_s": round(step_s, 4) if step_s else None,
        "steady_tokens_per_s": round(tokens / max(trainer.state.global_step, 1) / steady_s, 1) if steady_s else None,
        "world_size": trainer.args.world_size,
        "peak_memory_gib": _peak_memory_gib(),
        "first_train_loss": train_losses[0] if train_losses else None,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "final_eval_loss": eval_metrics.get("eval_loss", eval_losses[-1] if eval_losses else None),
        "packing": packing_stats or None,
        "packing_efficiency": (packing_stats or {}).get("train", {}).get("efficiency"),
    }
    summary = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}
    path = Path(cfg.output_dir) / "run_summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    log.info("wrote %s", path)
    return summary


def _peak_memory_gib() -> float | None:
    """Peak allocated accelerator memory of this (rank 0) process, or None on CPU."""
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None


def plot_losses(history: list[dict], path: Path) -> None:
    """Train and eval loss against step, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("loss", "train"), ("eval_loss", "eval")):
        pts = [(h["step"], h[key]) for h in history if key in h]
        if pts:
            ax.plot(*zip(*pts), marker="o" if key == "eval_loss" else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def preprocess(cfg, pm) -> tuple[int, int | None]:
    """Fill the prepared-dataset cache; returns (train rows, eval rows)."""
    if not cfg.dataset_prepared_path:
        raise ConfigError("dataset_prepared_path: set it so `host preprocess` has somewhere to write.")
    tokenizer, processor = model_mod.load_tokenizer_and_processor(cfg)
    train_ds, eval_ds = data.prepare(cfg, pm, tokenizer, processor)
    if not hasattr(train_ds, "__len__"):
        raise ConfigError(
            "datasets: a streaming dataset is tokenized as training consumes it; there is nothing for "
            "`host preprocess` to prepare. Run `host train` directly."
        )
    return len(train_ds), (len(eval_ds) if eval_ds is not None else None)
