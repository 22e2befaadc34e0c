"""Config models: the ``multimodal_pretrain`` dataset entry and the plugin's top-level keys."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from host.config import DatasetConfig, StrictModel

TYPE = "multimodal_pretrain"


class MultimodalPretrainDataset(DatasetConfig):
    """Raw image+text documents: ``{text_column: "... <image> ...", image_column: ["a.png", ...]}``."""

    type: Literal["multimodal_pretrain"] = TYPE
    text_column: str = Field("text", description="Column holding the document text with image placeholders.")
    image_column: str = Field("images", description="Column holding the list of image paths (or one path).")
    image_base_dir: str | None = Field(
        None, description="Directory image paths are resolved under; nothing outside it is ever read."
    )
    image_token: str | None = Field(
        None,
        description="Placeholder string used in the data; default: the processor's own image token. When it "
        "differs, it is rewritten to the processor's token before tokenization.",
    )
    skip_bad_rows: bool | None = Field(
        None, description="Drop (and count) bad rows instead of failing; default: the top-level skip_bad_rows."
    )
    allow_remote_images: bool = Field(False, description="Allow http(s) URLs as image references.")
    add_eos: bool = Field(True, description="Append the tokenizer's eos token to every document.")
    measure_images: bool = Field(
        True,
        description="Read each image's header (not its pixels) at preparation time, to check it exists and to "
        "count its image tokens against sequence_len.",
    )


class MMCPTConfig(StrictModel):
    """Top-level keys owned by the mmcpt plugin."""

    pretraining_dataset: list[MultimodalPretrainDataset] | None = Field(
        None, description="Streaming route: one multimodal_pretrain entry read as a stream (needs streaming: true)."
    )
    streaming: bool = Field(False, description="Read pretraining_dataset as a stream; max_steps is required.")
    skip_prepare_dataset: bool = Field(
        False, description="datasets: rows are already tokenized (input_ids/attention_mask/labels + text + images)."
    )
    ignore_data_skip: bool = Field(
        False,
        description="On resume, do not fast-forward the dataloader (HF TrainingArguments.ignore_data_skip); the "
        "streaming route then continues from the recorded stream position instead.",
    )
    skip_bad_rows: bool = Field(
        False, description="Drop and count bad rows (too long, missing/corrupt image, placeholder mismatch)."
    )
    remote_image_timeout: float = Field(30.0, gt=0, description="Seconds to wait for one remote image.")
