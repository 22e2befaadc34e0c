"""Shared fixtures: one tiny vision-language model + processor, and image+text data, per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from host_plugin_mmcpt import testing as mmt


@pytest.fixture(scope="session")
def vl_model(tmp_path_factory) -> Path:
    return mmt.build_tiny_vl(tmp_path_factory.mktemp("tiny-vl"))


@pytest.fixture(scope="session")
def mm_data(tmp_path_factory):
    """24 rows (18 with one unique image each, 6 text-only) in data.jsonl, images in images/."""
    root = tmp_path_factory.mktemp("mmdata")
    rows = mmt.make_rows(root / "images", 24)
    mmt.write_jsonl(root / "data.jsonl", rows)
    return root


@pytest.fixture(scope="session")
def processor(vl_model):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(vl_model))


@pytest.fixture
def image_stats():
    from host_plugin_mmcpt.images import STATS

    STATS.reset()
    yield STATS
    STATS.reset()
