"""Every cross-key rule, checked by `host validate`/load_config before anything loads."""

from __future__ import annotations

import pytest

from host.config import load_config
from host.errors import ConfigError

MM = {"path": "data.jsonl", "type": "multimodal_pretrain", "image_base_dir": "images"}


def base(**kw) -> dict:
    cfg = {"base_model": "no/such-model", "processor_type": "AutoProcessor", "plugins": ["mmcpt"],
           "output_dir": "out"}
    cfg.update(kw)
    return cfg


STREAM = {"pretraining_dataset": [MM], "streaming": True, "max_steps": 10}

RULES = [
    ("both routes", base(datasets=[MM], **STREAM), "pick one route"),
    ("streaming with datasets", base(datasets=[MM], streaming=True), "streaming: true applies to pretraining_dataset"),
    ("streaming without a stream", base(datasets=[{"path": "t.jsonl", "type": "completion"}], streaming=True),
     "needs a pretraining_dataset"),
    ("pretraining_dataset without streaming", base(pretraining_dataset=[MM], max_steps=5), "set streaming: true"),
    ("skip_prepare_dataset without mm datasets", base(skip_prepare_dataset=True, **STREAM),
     "skip_prepare_dataset: true applies"),
    ("two stream entries", base(**{**STREAM, "pretraining_dataset": [MM, MM]}), "give one entry"),
    ("mixed modalities", base(datasets=[MM, {"path": "t.jsonl", "type": "completion"}]), "cannot be mixed"),
    ("eval split of a stream", base(val_set_size=0.1, **STREAM), "val_set_size"),
    ("truncation", base(datasets=[MM], excess_length_strategy="truncate"), "excess_length_strategy: truncate"),
    ("truncation (stream)", base(excess_length_strategy="truncate", **STREAM), "excess_length_strategy: truncate"),
    ("no processor", base(datasets=[MM], processor_type=None), "processor_type"),
    ("other tokenizer", base(datasets=[MM], tokenizer="some/other-tokenizer"), "processor.tokenizer"),
    ("stream without max_steps", base(pretraining_dataset=[MM], streaming=True), "max_steps"),
    ("stream entry of another type", base(**{**STREAM, "pretraining_dataset": [{**MM, "type": "completion"}]}),
     "pretraining_dataset[0].type"),
    ("unknown entry key", base(datasets=[{**MM, "image_dir": "x"}]), "image_base_dir"),
]


@pytest.mark.parametrize("data,fragment", [r[1:] for r in RULES], ids=[r[0] for r in RULES])
def test_rule(data, fragment, write_config):
    with pytest.raises(ConfigError) as info:
        load_config(write_config(data))
    assert fragment in str(info.value)


def test_sample_packing_rejected(write_config):
    """The host's sample_packing cannot pack image rows: refused at validation, before any model loads."""
    data = base(datasets=[MM], sample_packing=True)
    with pytest.raises(ConfigError, match="sample_packing: multimodal_pretrain"):
        load_config(write_config(data))
    load_config(write_config({**data, "sample_packing": False}))
    with pytest.raises(ConfigError, match="eval_sample_packing: multimodal_pretrain"):
        load_config(write_config({**data, "sample_packing": False, "eval_sample_packing": True}))


def test_valid_routes_and_stream_injection(write_config):
    cfg, _, warnings = load_config(write_config(base(datasets=[MM], num_epochs=2)))
    assert cfg.datasets[0].text_column == "text" and cfg.datasets[0].image_column == "images"
    assert warnings == []
    cfg, _, warnings = load_config(write_config(base(ignore_data_skip=True, **STREAM)))
    assert [type(d).__name__ for d in cfg.datasets] == ["StreamingEntry"]  # handed to the host's data phase
    assert any("dataset_prepared_path" in w for w in warnings)
    cfg, _, warnings = load_config(write_config(base(ignore_data_skip=True, dataset_prepared_path="p", **STREAM)))
    assert warnings == []


def test_rules_fire_before_any_model_load(write_config, run_host):
    """`host train` stops on the rule (exit 2) although base_model does not even exist."""
    result = run_host("train", write_config(base(datasets=[MM], streaming=True)))
    assert result.exit_code == 2
    assert "streaming: true applies to pretraining_dataset" in result.output


def test_tokenizer_must_be_processor_tokenizer(processor, vl_model):
    from transformers import AutoTokenizer

    from host_plugin_mmcpt.encode import check_tokenizer

    check_tokenizer(processor.tokenizer, processor)
    other = AutoTokenizer.from_pretrained(str(vl_model))
    with pytest.raises(ConfigError, match=r"processor\.tokenizer"):
        check_tokenizer(other, processor)
    with pytest.raises(ConfigError, match="processor_type"):
        check_tokenizer(other, None)
