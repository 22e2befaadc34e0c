"""The trainer callback: honours ignore_data_skip and records the stream position in checkpoints."""

from __future__ import annotations

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState


class MMCPTStreamState(TrainerCallback, ExportableState):
    """``samples_consumed`` is saved in every checkpoint's trainer_state.json (stateful callbacks);
    a resumed streaming run starts its stream there. Also sets ``args.ignore_data_skip`` when the
    config asks for it (the host's TrainingArguments do not carry that key) and commits the stream
    caches whenever a checkpoint is saved, so a checkpoint never points past the cache."""

    def __init__(self, samples_consumed: int = 0, ignore_data_skip: bool = False, multimodal: bool = False):
        self.samples_consumed = int(samples_consumed)
        self.ignore_data_skip = bool(ignore_data_skip)
        self.multimodal = bool(multimodal)

    def state(self) -> dict:
        return {"args": {"samples_consumed": self.samples_consumed, "ignore_data_skip": self.ignore_data_skip,
                         "multimodal": self.multimodal}, "attributes": {}}

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        # accelerate's default for an IterableDataset under several processes: rank 0 reads
        # world_size batches, concatenates and re-slices them, which cannot work for multimodal
        # batches (different widths; pixel_values are per image, not per row).
        if self.multimodal and args.world_size > 1 and type(train_dataloader).__name__ == "DataLoaderDispatcher":
            from host.errors import ConfigError

            raise ConfigError(
                "streaming: multi-process training of a multimodal stream needs every process to read its own "
                "batches (accelerate dispatch_batches=False), but the Trainer dispatches batches from rank 0. Train "
                "the streaming route on one process, or use the non-streaming `datasets:` route."
            )

    def on_init_end(self, args, state, control, **kwargs):
        if self.ignore_data_skip:
            args.ignore_data_skip = True

    def on_step_end(self, args, state, control, **kwargs):
        self.samples_consumed += args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size

    def on_save(self, args, state, control, **kwargs):
        from host_plugin_mmcpt.stream import commit_all

        commit_all()

    def on_train_end(self, args, state, control, **kwargs):
        from host_plugin_mmcpt.stream import commit_all

        commit_all()
