"""Resolving image references safely and loading images, with counters the tests read.

Rules: a reference is a relative path under ``image_base_dir`` (no ``..`` component, not absolute,
not resolving outside the base through a symlink) or, only with ``allow_remote_images``, an
http(s) URL. Nothing outside the base directory is ever opened.
"""

from __future__ import annotations

import io
import os
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from urllib.parse import urlparse

from host.errors import DataError


@dataclass
class Stats:
    """Process-wide counters: image decodes (``loads``) and header-only opens (``headers``).

    ``opened`` lists ``(kind, reference)`` for every file or URL touched, so a test can assert
    exactly which samples' images a run read."""

    loads: int = 0
    headers: int = 0
    opened: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, kind: str, ref: str) -> None:
        with self.lock:
            if kind == "load":
                self.loads += 1
            else:
                self.headers += 1
            self.opened.append((kind, ref))

    def reset(self) -> None:
        with self.lock:
            self.loads = self.headers = 0
            self.opened = []


STATS = Stats()


class UnsafeImageRef(DataError):
    """A reference that points outside the allowed directory, or a refused URL/scheme."""


class BadImage(DataError):
    """A missing, unreadable or corrupt image (a bad row: skippable with skip_bad_rows)."""


def is_url(ref: str) -> bool:
    return urlparse(ref).scheme.lower() in ("http", "https")


def resolve(ref, base: str | None, allow_remote: bool, where: str) -> str:
    """Return the absolute path (or URL) ``ref`` stands for, or raise :class:`UnsafeImageRef`."""
    if not isinstance(ref, str) or not ref:
        raise BadImage(f"{where}: image reference {ref!r} is not a non-empty string.")
    if "\x00" in ref:
        raise BadImage(f"{where}: image reference {ref!r} holds a NUL byte; no file can have that name.")
    if is_url(ref):
        if not allow_remote:
            raise UnsafeImageRef(
                f"{where}: image {ref!r} is a URL; remote images are refused. Download it under image_base_dir, "
                f"or set allow_remote_images: true on the dataset entry."
            )
        return ref
    scheme = urlparse(ref).scheme
    if scheme and len(scheme) > 1:  # file://, s3://, data: ... (a 1-letter scheme is a Windows drive)
        raise UnsafeImageRef(
            f"{where}: image {ref!r} uses scheme {scheme!r}; only paths relative to image_base_dir "
            f"(and http(s) URLs with allow_remote_images) are accepted."
        )
    if os.path.isabs(ref) or PureWindowsPath(ref).is_absolute() or PureWindowsPath(ref).drive:
        raise UnsafeImageRef(
            f"{where}: image {ref!r} is an absolute path; it must be relative to image_base_dir."
        )
    if ".." in PurePosixPath(ref.replace("\\", "/")).parts:
        raise UnsafeImageRef(f"{where}: image {ref!r} contains '..'; paths may not leave image_base_dir.")
    if base is None:
        raise UnsafeImageRef(
            f"{where}: image {ref!r} is a relative path but the entry has no image_base_dir; set "
            f"image_base_dir to the directory holding the images."
        )
    root = Path(base)
    target = (root / ref).resolve()
    if not target.is_relative_to(root):
        raise UnsafeImageRef(
            f"{where}: image {ref!r} resolves to {target}, outside image_base_dir {root} (a symlink?); refused."
        )
    return str(target)


def resolve_base(image_base_dir: str | None, where: str) -> str | None:
    if image_base_dir is None:
        return None
    base = Path(image_base_dir).expanduser()
    if not base.is_dir():
        raise DataError(f"{where}: image_base_dir {image_base_dir!r} is not a directory. Check the path.")
    return str(base.resolve())


def _open(target: str, ref: str, timeout: float, where: str):
    from PIL import Image

    if is_url(target):
        import urllib.request

        try:
            with urllib.request.urlopen(target, timeout=timeout) as resp:  # noqa: S310 (scheme checked)
                data = resp.read()
        except Exception as exc:
            raise BadImage(f"{where}: image {ref!r} cannot be downloaded: {exc}") from None
        return Image.open(io.BytesIO(data))
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        raise BadImage(f"{where}: image {ref!r} not found ({target}).") from None
    except OSError as exc:
        raise BadImage(f"{where}: image {ref!r} cannot be read ({exc.strerror}).") from None
    if stat.S_ISDIR(mode):
        raise BadImage(f"{where}: image {ref!r} is a directory ({target}).")
    if not stat.S_ISREG(mode):  # a FIFO or device would block the read forever
        raise BadImage(f"{where}: image {ref!r} is not a regular file (a pipe, socket or device: {target}); refused.")
    try:
        return Image.open(target)
    except FileNotFoundError:
        raise BadImage(f"{where}: image {ref!r} not found ({target}).") from None
    except IsADirectoryError:
        raise BadImage(f"{where}: image {ref!r} is a directory ({target}).") from None
    except Exception as exc:
        raise BadImage(f"{where}: image {ref!r} is not a readable image ({type(exc).__name__}: {exc}).") from None


def image_size(ref, base, allow_remote, where: str, timeout: float = 30.0) -> tuple[int, int]:
    """``(height, width)`` from the image header; the file's structure and checksums are verified
    too (PIL ``verify``: a corrupt body behind a valid header fails here, at preparation, not in
    the middle of training), but pixels are not decoded."""
    target = resolve(ref, base, allow_remote, where)
    STATS.record("header", target)
    img = _open(target, ref, timeout, where)
    try:
        width, height = img.size
        img.verify()
    except Exception as exc:
        raise BadImage(f"{where}: image {ref!r} is corrupt or truncated ({type(exc).__name__}: {exc}).") from None
    finally:
        img.close()
    if not width or not height:
        raise BadImage(f"{where}: image {ref!r} has size {width}x{height}.")
    return height, width


def load_image(ref, base, allow_remote, where: str, timeout: float = 30.0):
    """Decode one image to RGB; every failure names ``where`` (row and file)."""
    target = resolve(ref, base, allow_remote, where)
    STATS.record("load", target)
    img = _open(target, ref, timeout, where)
    try:
        img.load()
        return img.convert("RGB") if img.mode != "RGB" else img
    except Exception as exc:
        raise BadImage(f"{where}: image {ref!r} is corrupt or truncated ({type(exc).__name__}: {exc}).") from None
