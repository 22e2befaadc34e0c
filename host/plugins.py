"""Find plugins through entry points, load exactly the enabled ones, register them with pluggy.

The manager is built per run from the config's ``plugins:`` list (never at import time), so tests
can build as many as they like. Plugins that are installed but not named are never imported.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import pluggy

from host import hookspecs
from host.errors import PluginError

ENTRY_POINT_GROUP = "host.plugins"
BUILTIN_NAME = "host"


@dataclass(frozen=True)
class PluginInfo:
    """What ``host plugins list`` shows, read from metadata and source without importing."""

    name: str
    distribution: str
    version: str
    module: str
    hooks: tuple[str, ...]


def _claims() -> dict[str, list[EntryPoint]]:
    """``{plugin name: entry points}``; more than one means several distributions claim the name."""
    out: dict[str, list[EntryPoint]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        out.setdefault(ep.name, []).append(ep)
    return out


def _entry_points() -> dict[str, EntryPoint]:
    return {name: eps[0] for name, eps in _claims().items()}


def _dist_name(ep: EntryPoint) -> str:
    return ep.dist.name if ep.dist else "?"


def conflicts() -> dict[str, list[str]]:
    """``{plugin name: [distribution, ...]}`` for names claimed by more than one distribution."""
    return {name: [_dist_name(ep) for ep in eps] for name, eps in sorted(_claims().items()) if len(eps) > 1}


def hook_names() -> list[str]:
    """The hooks a plugin may implement, as declared in :mod:`host.hookspecs`."""
    return sorted(n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "host_spec"))


def _module_file(module: str) -> str | None:
    """The source file of a (dotted) module, found without importing any package on the way."""
    top, *rest = module.split(".")
    try:
        spec = importlib.util.find_spec(top)  # a top-level lookup executes nothing
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    origin, dirs = spec.origin, list(spec.submodule_search_locations or [])
    for part in rest:
        candidates = [Path(d) / f"{part}.py" for d in dirs] + [Path(d) / part / "__init__.py" for d in dirs]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            return None
        origin, dirs = str(found), [str(found.parent)] if found.name == "__init__.py" else []
    return origin if origin and origin.endswith(".py") else None


def _hooks_in_source(module: str) -> tuple[str, ...]:
    """Names of hookimpl-decorated functions in ``module``'s source, found without executing it."""
    origin = _module_file(module)
    if origin is None:
        return ()
    with open(origin, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=origin)
    known = set(hook_names())
    return tuple(
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name in known and node.decorator_list
    )


def installed_plugins() -> list[PluginInfo]:
    """Every plugin registered under the ``host.plugins`` entry-point group."""
    infos = []
    for ep in sorted((ep for eps in _claims().values() for ep in eps), key=lambda e: (e.name, _dist_name(e))):
        dist = ep.dist
        module = ep.value.split(":")[0]
        infos.append(
            PluginInfo(
                name=ep.name,
                distribution=dist.name if dist else "?",
                version=dist.version if dist else "?",
                module=module,
                hooks=_hooks_in_source(module),
            )
        )
    return infos


def _unknown_plugin(name: str, installed: list[str]) -> PluginError:
    close = difflib.get_close_matches(name, installed, n=1)
    listing = ", ".join(installed) if installed else "none"
    if close:
        fix = f"Did you mean {close[0]!r}? Fix the name in `plugins:`."
    else:
        fix = f"Install it (pip install host-plugin-{name.replace('_', '-')}) or remove it from `plugins:`."
    return PluginError(f"plugins: unknown plugin {name!r}. {fix} Installed plugins: {listing}.")


def _import_failure(ep: EntryPoint, exc: BaseException) -> PluginError:
    """Say where the import failed and what fixes it: a missing dependency is installed, a missing
    plugin module means a broken install, anything else is a bug at the file and line shown."""
    import traceback

    where = f"plugin {ep.name!r} ({ep.value}, from {_dist_name(ep)})"
    module = ep.value.split(":")[0]
    if isinstance(exc, ModuleNotFoundError) and exc.name and not (module + ".").startswith(exc.name + "."):
        return PluginError(
            f"plugins: {where} failed to import: it needs the module {exc.name!r}, which is not installed. "
            f"Install the package that provides it (often `pip install {exc.name.split('.')[0]}`), or remove "
            f"{ep.name!r} from `plugins:`. HOST_DEBUG=1 shows the traceback."
        )
    if isinstance(exc, ModuleNotFoundError):
        return PluginError(
            f"plugins: {where} failed to import: its module {module!r} is missing although the distribution "
            f"is installed. Reinstall it (pip install --force-reinstall {_dist_name(ep)}) or remove it from `plugins:`."
        )
    if isinstance(exc, SyntaxError) and exc.filename:
        at = f"{exc.filename}:{exc.lineno}"
    else:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<")]
        at = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
    return PluginError(
        f"plugins: {where} failed to import, at {at}: {type(exc).__name__}: {exc}. Fix the error there "
        f"(it is in the plugin or what it imports), or remove {ep.name!r} from `plugins:`. "
        f"HOST_DEBUG=1 shows the traceback."
    )


def load_plugin_modules(names: list[str]) -> list[tuple[str, object]]:
    """Import the named plugins (and only them) through stevedore, in the given order."""
    from stevedore import ExtensionManager, NamedExtensionManager

    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise PluginError(f"plugins: {', '.join(dupes)} listed more than once; list each plugin once.")
    claims = _claims()
    installed = sorted(claims)
    for name in names:
        if name not in installed:
            raise _unknown_plugin(name, installed)
        if len(claims[name]) > 1:
            dists = ", ".join(f"{_dist_name(ep)} ({ep.value})" for ep in claims[name])
            raise PluginError(
                f"plugins: plugin name {name!r} is claimed by {len(claims[name])} installed distributions: {dists}. "
                f"Uninstall all but one of them (pip uninstall ...); nothing was imported."
            )

    def on_failure(_manager, ep, exc):
        raise _import_failure(ep, exc) from exc

    # stevedore memoises a group's entry points per process; drop that so plugins installed since
    # (a notebook's pip install, a test's local plugin) are seen, as our own check above saw them.
    ExtensionManager.ENTRY_POINT_CACHE.pop(ENTRY_POINT_GROUP, None)
    _forget_stevedore_path_cache()
    manager = NamedExtensionManager(
        namespace=ENTRY_POINT_GROUP,
        names=names,
        invoke_on_load=False,
        name_order=True,
        on_load_failure_callback=on_failure,
    )
    return [(ext.name, ext.plugin) for ext in manager.extensions]


def _forget_stevedore_path_cache() -> None:
    """stevedore also memoises entry points per ``sys.path`` value in-process (``stevedore._cache``);
    a plugin installed into a directory already on the path would stay invisible. Dropped when present."""
    try:
        from stevedore import _cache
    except ImportError:
        return
    internal = getattr(getattr(_cache, "_c", None), "_internal", None)
    if isinstance(internal, dict):
        internal.clear()


def check_requirements(modules: list[tuple[str, object]]) -> None:
    """A plugin's ``REQUIRES`` names must all be enabled, and listed before it (they run first)."""
    enabled = [name for name, _ in modules]
    requires = {name: list(getattr(module, "REQUIRES", ()) or ()) for name, module in modules}
    for name in enabled:
        for needed in requires[name]:
            if needed not in enabled:
                raise PluginError(
                    f"plugins: plugin {name!r} requires plugin {needed!r}, which is not enabled. "
                    f"Add {needed!r} to `plugins:` (before {name!r})."
                )
    for name in enabled:
        late = [n for n in requires[name] if enabled.index(n) > enabled.index(name)]
        if late:
            raise PluginError(
                f"plugins: plugin {name!r} requires {', '.join(map(repr, late))}, which must come before it "
                f"(hooks run in `plugins:` order). Write plugins: [{', '.join(_required_first(enabled, requires))}]."
            )


def _required_first(enabled: list[str], requires: dict[str, list[str]]) -> list[str]:
    """``enabled`` reordered so every plugin follows the plugins it requires (stable otherwise)."""
    out: list[str] = []

    def place(name: str, path: tuple[str, ...] = ()) -> None:
        if name in out or name in path:
            return
        for needed in requires.get(name, []):
            place(needed, (*path, name))
        out.append(name)

    for name in enabled:
        place(name)
    return out


def build_plugin_manager(names: list[str]) -> pluggy.PluginManager:
    """A fresh manager with the built-in plugin plus the named plugins, hooks checked."""
    from host import builtin

    modules = load_plugin_modules(list(names))
    check_requirements(modules)
    pm = pluggy.PluginManager("host")
    pm.add_hookspecs(hookspecs)
    # pluggy calls the most recently registered plugin first: register in reverse so that hooks
    # run in `plugins:` order, with the host's built-in plugin last.
    for name, module in [(BUILTIN_NAME, builtin), *reversed(modules)]:
        try:
            pm.register(module, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugins: plugin {name!r} breaks the hook contract: {exc}") from exc
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(
            f"plugins: {exc}. Hook names must match host.hookspecs "
            f"({', '.join(hook_names())})."
        ) from exc
    return pm


def plugin_versions(pm: pluggy.PluginManager) -> dict[str, str]:
    """``{plugin name: distribution version}`` of the enabled plugins, for summaries and cache keys."""
    eps = _entry_points()
    out = {}
    for name, _ in pm.list_name_plugin():
        if name == BUILTIN_NAME:
            continue
        dist = eps[name].dist if name in eps else None
        out[name] = dist.version if dist else "?"
    return dict(sorted(out.items()))
