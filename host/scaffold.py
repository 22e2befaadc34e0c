"""``host plugins new NAME``: a ready-to-install plugin distribution with a passing test."""

from __future__ import annotations

import keyword
from pathlib import Path

from host.errors import HostError

_PYPROJECT = """\
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "host-plugin-{dist}"
version = "0.1.0"
description = "host plugin: {name}"
readme = "README.md"
requires-python = ">=3.10"
# the host API this plugin was written against: the next minor release may change hooks
dependencies = ["{host_range}"]

[project.optional-dependencies]
test = ["host[test]"]

[project.entry-points."host.plugins"]
{name} = "host_plugin_{name}"

[tool.setuptools]
packages = ["host_plugin_{name}"]
"""

_INIT = '''\
"""host plugin {name}: describe what it does and why here.

Keep this module light: the host imports it for every command that reads a config (even
``host validate``), so import torch/transformers inside the hooks that need them.
"""

from __future__ import annotations

from pydantic import BaseModel

from host import hookimpl

#: Other plugins this one needs enabled, and listed before it (checked before anything loads).
REQUIRES: list[str] = []


class {cls}Config(BaseModel):
    """This plugin's top-level config keys; every field needs a default."""

    {name}_enabled: bool = True


@hookimpl
def config_model():
    return {cls}Config


@hookimpl
def trainer_callbacks(cfg):
    if not cfg.{name}_enabled:
        return []
    from host_plugin_{name}.callbacks import {cls}Callback  # imports transformers: only when training

    return [{cls}Callback()]
'''

_CALLBACKS = '''\
"""Trainer callbacks (imported only by the ``trainer_callbacks`` hook, when a run trains)."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback


class {cls}Callback(TrainerCallback):
    """Writes how many optimizer steps ran to output_dir/{name}.json, to show the plugin ran."""

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            Path(args.output_dir, "{name}.json").write_text(json.dumps({{"steps": state.global_step}}))
'''

_README = """\
# host-plugin-{dist}

A plugin for [host](https://example.invalid/host). Enable it in a run's config:

```yaml
plugins: [{name}]
{name}_enabled: true
```

| key | default | meaning |
| --- | --- | --- |
| `{name}_enabled` | `true` | turn the plugin's callback on or off |

Develop: `pip install -e '.[test]' && pytest tests` (the `test` extra brings pytest and host's fixtures).
"""

_TEST = '''\
"""Runs a real (tiny) `host train` with this plugin enabled."""

import json

from host.testing import base_config


def test_listed(run_host):
    assert "{name}" in run_host("plugins", "list").output


def test_trains_with_plugin(tiny_model, text_file, write_config, run_host, tmp_path):
    out = tmp_path / "out"
    cfg = base_config(tiny_model("qwen3_moe"), text_file, out, plugins=["{name}"], max_steps=3)
    result = run_host("train", write_config(cfg))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "{name}.json").read_text()) == {{"steps": 3}}
    assert "{name}" in json.loads((out / "run_summary.json").read_text())["plugins"]
'''


def host_range() -> str:
    """``host>=X.Y,<X.(Y+1)``: the host release line whose hooks a new plugin is written against."""
    from host import __version__

    parts = __version__.split(".")
    if len(parts) < 2 or not (parts[0].isdigit() and parts[1].isdigit()):
        return "host"
    major, minor = int(parts[0]), int(parts[1])
    return f"host>={major}.{minor},<{major}.{minor + 1}"


def scaffold(name: str, parent: Path) -> Path:
    """Write ``parent/host-plugin-<name>/`` and return it; refuses to overwrite."""
    if not name.isidentifier() or keyword.iskeyword(name) or name != name.lower():
        raise HostError(f"plugin name {name!r}: use a lowercase Python identifier such as 'my_feature'.")
    dist = name.replace("_", "-")
    target = Path(parent) / f"host-plugin-{dist}"
    if target.exists():
        raise HostError(f"{target} already exists; choose another name or --path (nothing was written).")
    cls = "".join(part.capitalize() for part in name.split("_"))
    files = {
        "pyproject.toml": _PYPROJECT,
        f"host_plugin_{name}/__init__.py": _INIT,
        f"host_plugin_{name}/callbacks.py": _CALLBACKS,
        "README.md": _README,
        "tests/test_plugin.py": _TEST,
    }
    for rel, text in files.items():
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.format(name=name, dist=dist, cls=cls, host_range=host_range()))
    return target
