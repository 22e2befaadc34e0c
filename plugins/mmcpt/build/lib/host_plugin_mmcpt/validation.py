"""Cross-key rules, checked before any model or tokenizer loads."""

from __future__ import annotations

from pathlib import Path

from host.errors import ConfigError

from host_plugin_mmcpt.config import TYPE, MultimodalPretrainDataset


def validate(cfg, streaming_entry_cls) -> list[str]:
    warnings: list[str] = []
    injected = [d for d in cfg.datasets if isinstance(d, streaming_entry_cls)]
    mm = [d for d in cfg.datasets if isinstance(d, MultimodalPretrainDataset) and d not in injected]
    others = [d for d in cfg.datasets if not isinstance(d, MultimodalPretrainDataset)]
    stream = cfg.pretraining_dataset or []

    if stream and mm:
        raise ConfigError(
            "pretraining_dataset/datasets: multimodal_pretrain is declared under both; pick one route: "
            "`datasets:` (non-streaming, epochs) or `pretraining_dataset:` with streaming: true (max_steps)."
        )
    if cfg.streaming and mm:
        raise ConfigError(
            "streaming: true applies to pretraining_dataset only; the multimodal_pretrain entries under "
            "`datasets:` are non-streaming. Set streaming: false, or move the entry to pretraining_dataset."
        )
    if cfg.streaming and not stream:
        raise ConfigError("streaming: true needs a pretraining_dataset entry to stream; add one or set streaming: false.")
    if stream and not cfg.streaming:
        raise ConfigError(
            "pretraining_dataset: is the streaming route; set streaming: true (and max_steps), or move the entry "
            "under `datasets:` for a non-streaming run."
        )
    if cfg.skip_prepare_dataset and not mm:
        raise ConfigError(
            "skip_prepare_dataset: true applies to multimodal_pretrain entries under `datasets:` (already-tokenized "
            "rows); no such entry is configured" + (" (the streaming route tokenizes as it reads)." if stream else ".")
        )
    if not (mm or stream):
        return warnings

    if len(stream) > 1:
        raise ConfigError(
            "pretraining_dataset: give one entry; point its path at a directory or a glob (shards/*.jsonl) "
            "to stream several files."
        )
    if others:
        kinds = sorted({d.type for d in others})
        raise ConfigError(
            f"datasets: multimodal_pretrain cannot be mixed with {kinds} entries in one run: the eval split and the "
            f"batches must share the training modality. Train them in separate runs."
        )
    if stream and cfg.val_set_size:
        raise ConfigError(
            "val_set_size: an eval split cannot be taken from a streaming pretraining_dataset; set val_set_size: 0 "
            "(or use the non-streaming `datasets:` route, whose eval split is multimodal like the training rows)."
        )
    if cfg.excess_length_strategy == "truncate":
        raise ConfigError(
            "excess_length_strategy: truncate would cut image placeholders off multimodal_pretrain rows; use drop "
            "or raise (rows longer than sequence_len fail with their index, or are dropped with skip_bad_rows: true)."
        )
    for key in ("sample_packing", "eval_sample_packing"):
        if getattr(cfg, key, False):
            raise ConfigError(
                f"{key}: multimodal_pretrain rows are collated one document per row (images are processed "
                f"per row at batch time) and cannot be packed; set {key}: false."
            )
    if not cfg.processor_type:
        raise ConfigError(
            "processor_type: multimodal_pretrain needs the model's processor (images and the image token); set "
            "processor_type: AutoProcessor."
        )
    if cfg.tokenizer and Path(cfg.tokenizer).expanduser() != Path(cfg.base_model).expanduser():
        raise ConfigError(
            f"tokenizer: {cfg.tokenizer!r} differs from base_model; multimodal_pretrain uses processor.tokenizer so "
            f"image token ids match the processor. Remove `tokenizer:`."
        )
    if stream and not cfg.max_steps:
        raise ConfigError("max_steps: the streaming route (pretraining_dataset) has no length; set max_steps.")
    if stream and any(isinstance(e, MultimodalPretrainDataset) and e.type != TYPE for e in stream):
        raise ConfigError("pretraining_dataset: entries must have type: multimodal_pretrain.")
    if cfg.ignore_data_skip and stream and not cfg.dataset_prepared_path:
        warnings.append(
            "ignore_data_skip without dataset_prepared_path: a resumed streaming run re-reads and re-tokenizes the "
            "text of rows already trained on to find its position (images are not decoded); set "
            "dataset_prepared_path to seek there through the stream cache instead."
        )
    if stream and not injected:
        entry = stream[0]
        cfg.datasets = [streaming_entry_cls.model_validate(entry.model_dump())]
    return warnings
