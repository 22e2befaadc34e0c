"""Hostile rows: each is refused at preprocess with a clean error naming the file, row and field."""

from __future__ import annotations

import os
import threading
import zlib

import pytest

from host_plugin_mmcpt import images as im
from host_plugin_mmcpt import testing as mmt

BOI = mmt.BOI


@pytest.fixture
def base(tmp_path):
    root = tmp_path / "images"
    mmt.make_png(root / "ok.png")
    return root


def _preprocess(vl_model, base, tmp_path, write_config, run_host, rows, **entry_keys):
    data = mmt.write_jsonl(tmp_path / "data.jsonl", rows)
    entry = {"path": str(data), "type": "multimodal_pretrain", "image_base_dir": str(base), **entry_keys}
    cfg = mmt.mm_config(vl_model, tmp_path / "out", datasets=[entry], dataset_prepared_path=str(tmp_path / "prep"))
    return run_host("preprocess", write_config(cfg)), str(data)


def _corrupt_body(src, dst):
    """A PNG whose signature and IHDR are intact but whose image data bytes are flipped (CRC left as is)."""
    raw = bytearray(src.read_bytes())
    at = raw.index(b"IDAT") + 4
    for i in range(at, at + 12):
        raw[i] ^= 0xFF
    dst.write_bytes(bytes(raw))


def test_nul_byte_in_image_reference(vl_model, base, tmp_path, write_config, run_host):
    rows = [{"text": f"fine {BOI}", "images": ["ok.png"]}, {"text": f"bad {BOI}", "images": ["ok\x00.png"]}]
    result, data = _preprocess(vl_model, base, tmp_path, write_config, run_host, rows)
    assert result.exit_code == 2, result.output
    assert data in result.output and "row 1: image" in result.output and "NUL byte" in result.output
    assert "Traceback" not in result.output


def test_corrupt_png_body_behind_valid_header(vl_model, base, tmp_path, write_config, run_host):
    _corrupt_body(base / "ok.png", base / "broken.png")
    from PIL import Image

    assert Image.open(base / "broken.png").size == (24, 24)  # the header alone looks fine
    rows = [{"text": f"fine {BOI}", "images": ["ok.png"]}, {"text": f"bad {BOI}", "images": ["broken.png"]}]
    result, data = _preprocess(vl_model, base, tmp_path, write_config, run_host, rows)
    assert result.exit_code == 2, result.output
    assert data in result.output and "row 1: image 'broken.png' is corrupt" in result.output


def test_crc_consistent_garbage_is_caught_when_loaded(base):
    """Garbage whose chunk CRCs were recomputed passes verify(); decoding still names the row."""
    raw = bytearray((base / "ok.png").read_bytes())
    at = raw.index(b"IDAT")
    length = int.from_bytes(raw[at - 4:at], "big")
    body = bytes(b ^ 0x5A for b in raw[at + 4:at + 4 + length])
    raw[at + 4:at + 4 + length] = body
    raw[at + 4 + length:at + 8 + length] = zlib.crc32(b"IDAT" + body).to_bytes(4, "big")
    (base / "sly.png").write_bytes(bytes(raw))
    with pytest.raises(im.BadImage, match="row 9: image 'sly.png'"):
        im.image_size("sly.png", str(base), False, "data.jsonl: row 9")
        im.load_image("sly.png", str(base), False, "data.jsonl: row 9")


def test_row_missing_its_images_column(vl_model, base, tmp_path, write_config, run_host):
    rows = [{"text": f"fine {BOI}", "pics": ["ok.png"]}]
    result, data = _preprocess(vl_model, base, tmp_path, write_config, run_host, rows)
    assert result.exit_code == 2, result.output
    assert data in result.output and "row 0" in result.output and "no 'images' column" in result.output and "pics" in result.output


def test_both_generic_and_processor_image_tokens(vl_model, base, tmp_path, write_config, run_host):
    rows = [{"text": f"one <image> two {BOI}", "images": ["ok.png", "ok.png"]}]
    result, data = _preprocess(vl_model, base, tmp_path, write_config, run_host, rows, image_token="<image>")
    assert result.exit_code == 2, result.output
    assert data in result.output and "row 0: column 'text' holds the processor's own image token" in result.output
    result, data = _preprocess(vl_model, base, tmp_path, write_config, run_host, rows)
    assert result.exit_code == 2, result.output
    assert "holds '<image>', which is not this processor's image token" in result.output


def test_image_that_is_a_fifo_is_refused_without_hanging(vl_model, base, tmp_path, write_config, run_host):
    os.mkfifo(base / "pipe.png")
    rows = [{"text": f"bad {BOI}", "images": ["pipe.png"]}]
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(
        r=_preprocess(vl_model, base, tmp_path, write_config, run_host, rows)), daemon=True)
    worker.start()
    worker.join(120)
    if worker.is_alive():
        with open(base / "pipe.png", "wb"):
            pass
        pytest.fail("preprocess blocked on a FIFO image")
    result, data = outcome["r"]
    assert result.exit_code == 2, result.output
    assert data in result.output and "row 0: image 'pipe.png' is not a regular file" in result.output
    with pytest.raises(im.BadImage, match="not a regular file"):
        im.load_image("pipe.png", str(base), False, "row 0")
