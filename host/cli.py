"""``host`` command line. Heavy imports (torch, transformers, pydantic) happen inside commands."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path

import typer

from host.errors import HostError

app = typer.Typer(help="host: fine-tune LLMs with plugins.", no_args_is_help=True, add_completion=False)
plugins_app = typer.Typer(help="List installed plugins or scaffold a new one.", no_args_is_help=True)
app.add_typer(plugins_app, name="plugins")

CONFIG = typer.Argument(..., help="Path to the run's YAML config.", show_default=False)


def _debug() -> bool:
    return os.environ.get("HOST_DEBUG", "").lower() not in ("", "0", "false", "no")


def _user_errors(fn):
    """Turn HostError into 'error: ...' on stderr and exit code 2, never a traceback
    (unless ``--debug``/``HOST_DEBUG=1``, which prints the whole chain behind the message first)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HostError as exc:
            if _debug():
                typer.echo(_full_traceback(exc), err=True, nl=False)
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _full_traceback(exc: BaseException) -> str:
    """Every exception in the chain, oldest first, including those hidden with ``raise ... from None``."""
    import traceback

    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    parts = ["".join(traceback.format_exception(type(e), e, e.__traceback__, chain=False)) for e in reversed(chain)]
    return "\nThe above led to:\n\n".join(parts)


def _versions(value: bool) -> None:
    if not value:
        return
    from host import __version__
    from host.plugins import installed_plugins

    typer.echo(f"host {__version__}")
    for info in installed_plugins():
        typer.echo(f"plugin {info.name} {info.version} ({info.distribution})")
    raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", callback=_versions, is_eager=True, help="Show host's and the installed plugins' versions."
    ),
    debug: bool = typer.Option(
        False, "--debug", help="On an error, also print the full traceback behind the message (or set HOST_DEBUG=1)."
    ),
) -> None:
    """host: fine-tune LLMs with plugins."""
    if debug:
        os.environ["HOST_DEBUG"] = "1"


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _load(config: Path):
    from host.config import load_config

    return load_config(config)


@app.command()
@_user_errors
def train(config: Path = CONFIG) -> None:
    """Train (or resume) as the config says; writes adapter, loss.png and run_summary.json."""
    _setup_logging()
    cfg, pm, warnings = _load(config)
    from host.train import train as run

    summary = run(cfg, pm, warnings)
    if summary:
        typer.echo(json.dumps(summary, indent=2))


@app.command()
@_user_errors
def preprocess(config: Path = CONFIG) -> None:
    """Tokenize the datasets into `dataset_prepared_path` without training."""
    _setup_logging()
    cfg, pm, warnings = _load(config)
    for w in warnings:
        logging.getLogger("host").warning(w)
    from host.train import preprocess as run

    n_train, n_eval = run(cfg, pm)
    typer.echo(f"prepared {n_train} train rows" + (f" and {n_eval} eval rows" if n_eval is not None else ""))


@app.command()
@_user_errors
def validate(config: Path = CONFIG) -> None:
    """Print the resolved config (plugin keys included); exit 2 on any error."""
    import yaml

    from host.config import HostConfig

    cfg, _pm, warnings = _load(config)
    for w in warnings:
        typer.echo(f"warning: {w}", err=True)
    resolved = cfg.model_dump(mode="json")
    host_keys = [k for k in HostConfig.model_fields if k in resolved]  # host keys first, then the plugins'
    ordered = {k: resolved[k] for k in host_keys} | {k: v for k, v in resolved.items() if k not in host_keys}
    typer.echo(yaml.safe_dump(ordered, sort_keys=False), nl=False)


@app.command("merge-lora")
@_user_errors
def merge_lora(
    config: Path = CONFIG,
    out: Path = typer.Option(None, help="Where to write the merged model (default: output_dir/merged)."),
) -> None:
    """Merge the trained LoRA adapter in output_dir into the base model and save it."""
    _setup_logging()
    cfg, pm, _ = _load(config)
    from host.merge import merge

    path = merge(cfg, pm, out)
    typer.echo(f"merged model written to {path}")


@plugins_app.command("list")
def plugins_list() -> None:
    """Installed plugins with distribution, version and hooks (imports no plugin code)."""
    from host.plugins import conflicts, installed_plugins

    infos = installed_plugins()
    if not infos:
        typer.echo("no plugins installed")
        return
    rows = [("name", "distribution", "version", "hooks")]
    rows += [(i.name, i.distribution, i.version, ", ".join(i.hooks) or "-") for i in infos]
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    for r in rows:
        typer.echo("  ".join(r[c].ljust(widths[c]) for c in range(3)) + "  " + r[3])
    for name, dists in conflicts().items():
        typer.echo(
            f"warning: plugin name {name!r} is claimed by {len(dists)} distributions ({', '.join(dists)}); "
            f"enabling it is an error until all but one are uninstalled.",
            err=True,
        )


@plugins_app.command("new")
@_user_errors
def plugins_new(
    name: str = typer.Argument(..., help="Plugin name (a Python identifier, e.g. my_feature)."),
    path: Path = typer.Option(Path("."), help="Directory in which to create the plugin's folder."),
) -> None:
    """Scaffold a plugin distribution: pyproject, entry point, config model, hook, README, test."""
    from host.scaffold import scaffold

    target = scaffold(name, path)
    typer.echo(f"created {target}\nnext: pip install -e '{target}[test]' && pytest {target}/tests")


def main() -> None:
    app()
