"""Read a config file as YAML that cannot hurt the reader.

A config is small and written by hand, so anything else is refused before it costs time or
memory: special files (a FIFO would block ``open`` forever), huge files, duplicated keys (the
last one would silently win), nesting deeper than any config needs (PyYAML composes nodes
recursively and would die with RecursionError), and alias expansion beyond a fixed number of
nodes ("billion laughs": a few lines that expand to gigabytes once validated or dumped).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

from host.errors import ConfigError

#: A config is a few KiB; 4 MiB leaves room for inlined prompts and chat templates.
MAX_BYTES = 4 * 2**20
#: Deepest nesting a config may have (axolotl configs use about 4 levels).
MAX_DEPTH = 64
#: Most nodes the document may have once every alias is expanded.
MAX_NODES = 100_000


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader with bounded nesting depth and alias expansion, refusing duplicate keys."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise _Refused(f"line {mark.line + 1}: nesting deeper than {MAX_DEPTH} levels; a config never needs that")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # SafeConstructor reports unhashable keys itself
            if key in seen:
                first = seen[key]
                raise _Refused(
                    f"line {key_node.start_mark.line + 1}: key {key!r} is given twice (first on line "
                    f"{first.start_mark.line + 1}); YAML would silently keep the last one. Remove one of them"
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


class _Refused(Exception):
    """A structural limit was hit; the message says where."""


def _expanded_size(root: yaml.Node) -> int:
    """Nodes in the document with every alias expanded (aliases share node objects), iteratively."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        if isinstance(node, yaml.ScalarNode):
            sizes[id(node)] = 1
            continue
        kids = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else list(node.value)
        if children_done:
            total = 1 + sum(sizes.get(id(k), 0) for k in kids)
            sizes[id(node)] = min(total, MAX_NODES + 1)
            continue
        stack.append((node, True))
        stack.extend((k, False) for k in kids if id(k) not in sizes)
    return sizes[id(root)]


def _check_file(path: Path) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found. Check the path.") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror}).") from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path}: cannot read config file (it is a directory). Give the path of a .yaml file.")
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(
            f"{path}: is not a regular file (a pipe, socket or device); a config must be a .yaml file on disk "
            f"(nothing was read from it)."
        )
    if st.st_size > MAX_BYTES:
        raise ConfigError(f"{path}: {st.st_size} bytes is too large for a config file (limit {MAX_BYTES}).")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file into a dict, turning every failure into a ConfigError naming the file."""
    path = Path(path)
    _check_file(path)
    try:
        # O_NONBLOCK: if the path was swapped for a FIFO after the check, open must not block
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ConfigError(f"{path}: is not a regular file; a config must be a .yaml file on disk.")
            raw = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror}).") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the config as UTF-8.") from None
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node) > MAX_NODES:
            raise _Refused(
                f"the document expands to more than {MAX_NODES} values through its aliases (&anchor/*alias); "
                f"a config never needs that. Write the values out or use fewer aliases"
            )
        data = loader.construct_document(node) if node is not None else None
    except _Refused as exc:
        raise ConfigError(f"{path}: {exc}.") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}:{where}: invalid YAML: {problem}. Fix the syntax there.") from None
    finally:
        loader.dispose()
    if data is None:
        raise ConfigError(f"{path}: config file is empty. Start from examples/quickstart.yaml.")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values, got {type(data).__name__}.")
    return data
