"""Image references: nothing outside image_base_dir is read; bad images name their row and file."""

from __future__ import annotations

import http.server
import os
import threading
from pathlib import Path

import pytest

from host_plugin_mmcpt import images as im
from host_plugin_mmcpt import testing as mmt


@pytest.fixture
def base(tmp_path) -> Path:
    root = tmp_path / "images"
    mmt.make_png(root / "ok.png")
    mmt.make_png(root / "sub" / "deep.png")
    mmt.make_png(tmp_path / "secret.png")  # outside the base
    return root


@pytest.mark.parametrize("ref,fragment", [
    ("../secret.png", "contains '..'"),
    ("sub/../../secret.png", "contains '..'"),
    ("sub/..\\..\\secret.png", "contains '..'"),
    ("/etc/passwd", "absolute path"),
    ("C:\\x.png", "absolute path"),
    ("file:///etc/passwd", "scheme 'file'"),
    ("s3://bucket/x.png", "scheme 's3'"),
    ("http://example.invalid/x.png", "remote images are refused"),
])
def test_refused_references(base, ref, fragment, image_stats):
    with pytest.raises(im.UnsafeImageRef, match=fragment) as info:
        im.load_image(ref, str(base), False, "data.jsonl: row 7")
    assert "row 7" in str(info.value)
    assert image_stats.opened == []  # refused before anything is opened


def test_symlinks(base, tmp_path, image_stats):
    os.symlink(tmp_path / "secret.png", base / "escape.png")
    os.symlink(base / "sub", base / "alias")
    with pytest.raises(im.UnsafeImageRef, match="outside image_base_dir"):
        im.load_image("escape.png", str(base), False, "row 1")
    assert im.load_image("alias/deep.png", str(base), False, "row 2").size == (24, 24)  # stays inside: fine
    assert [k for k, _ in image_stats.opened] == ["load"]


def test_relative_path_needs_base(base):
    with pytest.raises(im.UnsafeImageRef, match="no image_base_dir"):
        im.resolve("ok.png", None, False, "row 0")


def test_missing_and_corrupt_images(base):
    with pytest.raises(im.BadImage, match=r"row 3: image 'nope\.png' not found"):
        im.load_image("nope.png", str(base), False, "data.jsonl: row 3")
    (base / "garbage.png").write_bytes(b"not an image at all")
    with pytest.raises(im.BadImage, match=r"row 4: image 'garbage\.png' is not a readable image"):
        im.image_size("garbage.png", str(base), False, "data.jsonl: row 4")
    good = (base / "ok.png").read_bytes()
    (base / "truncated.png").write_bytes(good[: len(good) // 2])  # header fine, pixels cut
    with pytest.raises(im.BadImage, match=r"row 5: image 'truncated\.png' is corrupt"):
        im.image_size("truncated.png", str(base), False, "row 5")  # caught at preparation, not mid-training
    with pytest.raises(im.BadImage, match=r"row 5: image 'truncated\.png' is corrupt"):
        im.load_image("truncated.png", str(base), False, "row 5")


def test_remote_images_only_when_allowed(base, image_stats):
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(base), **k)  # noqa: E731
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/ok.png"
        with pytest.raises(im.UnsafeImageRef, match="allow_remote_images: true"):
            im.load_image(url, str(base), False, "row 0")
        assert im.load_image(url, str(base), True, "row 0").size == (24, 24)
        assert im.image_size(url, None, True, "row 0") == (24, 24)
        with pytest.raises(im.BadImage, match="cannot be downloaded"):
            im.load_image(url.replace("ok.png", "missing.png"), None, True, "row 1")
    finally:
        server.shutdown()


def _rows(base: Path) -> list[dict]:
    return [
        {"text": "a good row <start_of_image> here", "images": ["ok.png"]},
        {"text": "a missing image <start_of_image>", "images": ["missing.png"]},
        {"text": "two placeholders <start_of_image> <start_of_image>", "images": ["ok.png"]},
        {"text": "escape <start_of_image>", "images": ["../secret.png"]},
        {"text": "plain text row", "images": []},
    ]


@pytest.mark.parametrize("skip", [False, True])
def test_preprocess_names_bad_rows(vl_model, base, tmp_path, write_config, run_host, skip):
    data = tmp_path / "data.jsonl"
    rows = _rows(base)
    entry = {"path": str(data), "type": "multimodal_pretrain", "image_base_dir": str(base)}
    cfg = mmt.mm_config(vl_model, tmp_path / "out", datasets=[entry], dataset_prepared_path=str(tmp_path / "prep"),
                        skip_bad_rows=skip)
    mmt.write_jsonl(data, rows[:2] + rows[4:])
    result = run_host("preprocess", write_config(cfg))
    if not skip:
        assert result.exit_code == 2
        assert "row 1: image 'missing.png' not found" in result.output
    else:
        assert result.exit_code == 0, result.output
        assert "prepared 2 train rows" in result.output
    mmt.write_jsonl(data, [rows[0], rows[2], rows[4]])
    result = run_host("preprocess", write_config(cfg))
    if not skip:
        assert result.exit_code == 2 and "row 1: 2 image placeholder(s)" in result.output
    else:
        assert result.exit_code == 0 and "prepared 2 train rows" in result.output
    # unsafe references are refused even with skip_bad_rows
    mmt.write_jsonl(data, [rows[0], rows[3]])
    result = run_host("preprocess", write_config(cfg))
    assert result.exit_code == 2 and "row 1: image '../secret.png' contains '..'" in result.output


def test_oversized_row_fails_fast_with_its_index(vl_model, base, tmp_path, write_config, run_host):
    data = mmt.write_jsonl(tmp_path / "data.jsonl", [
        {"text": "short <start_of_image>", "images": ["ok.png"]},
        {"text": "long " * 40 + "<start_of_image>", "images": ["ok.png"]},
    ])
    entry = {"path": str(data), "type": "multimodal_pretrain", "image_base_dir": str(base)}
    cfg = mmt.mm_config(vl_model, tmp_path / "out", datasets=[entry], sequence_len=40,
                        dataset_prepared_path=str(tmp_path / "p"))
    result = run_host("preprocess", write_config(cfg))
    assert result.exit_code == 2 and "row 1:" in result.output and "sequence_len=40" in result.output
    result = run_host("preprocess", write_config({**cfg, "skip_bad_rows": True}))
    assert result.exit_code == 0 and "prepared 1 train rows" in result.output
