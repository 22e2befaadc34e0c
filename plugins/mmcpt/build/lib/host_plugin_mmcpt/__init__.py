"""host plugin mmcpt: multimodal (image+text) continued pretraining data.

Owns the ``multimodal_pretrain`` dataset type (non-streaming ``datasets:``, pre-tokenized rows with
``skip_prepare_dataset``, and streaming ``pretraining_dataset`` with a resumable cache) and the
collator that loads and processes images at batch time. See README.md.
"""

from __future__ import annotations

from host import hookimpl

# NOTE: no submodule may share a hook's name (e.g. ``collator``): importing it would replace the hook
# function on this package, and a later plugin manager would not see the hook.

from host_plugin_mmcpt.config import TYPE, MMCPTConfig, MultimodalPretrainDataset

REQUIRES: list[str] = []


class StreamingEntry(MultimodalPretrainDataset):
    """The ``pretraining_dataset`` entry, placed in ``datasets`` so the host's data phase calls
    this plugin's strategy for it (the host knows only ``datasets:``)."""


def mm_entries(cfg) -> list:
    return [d for d in cfg.datasets if isinstance(d, MultimodalPretrainDataset) and not isinstance(d, StreamingEntry)]


def in_use(cfg) -> bool:
    return bool(cfg.pretraining_dataset) or any(isinstance(d, MultimodalPretrainDataset) for d in cfg.datasets)


@hookimpl
def config_model():
    return MMCPTConfig


@hookimpl
def dataset_types():
    return {TYPE: MultimodalPretrainDataset}


@hookimpl
def validate_config(cfg):
    from host_plugin_mmcpt.validation import validate

    return validate(cfg, StreamingEntry)


@hookimpl
def dataset_strategy(cfg, dataset_cfg, tokenizer, processor):
    if not isinstance(dataset_cfg, MultimodalPretrainDataset):
        return None
    from host_plugin_mmcpt import strategy

    if isinstance(dataset_cfg, StreamingEntry):
        return strategy.StreamStrategy(cfg, dataset_cfg, tokenizer, processor)
    return strategy.MapStrategy(cfg, dataset_cfg, tokenizer, processor)


@hookimpl
def collator(cfg, tokenizer, processor):
    if not in_use(cfg):
        return None
    from host_plugin_mmcpt.collate import MultimodalCollator

    return MultimodalCollator(cfg, tokenizer, processor)


@hookimpl
def trainer_callbacks(cfg):
    from host_plugin_mmcpt.callbacks import MMCPTStreamState
    from host_plugin_mmcpt.strategy import RUNS

    start = RUNS.pop(id(cfg), {}).get("start", 0)
    return [MMCPTStreamState(samples_consumed=start, ignore_data_skip=cfg.ignore_data_skip, multimodal=in_use(cfg))]
