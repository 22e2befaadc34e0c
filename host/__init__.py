"""host: a minimal fine-tuning host where every feature is a plugin."""

from importlib.metadata import PackageNotFoundError, version

import pluggy

try:
    __version__ = version("host")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

#: Decorate plugin functions with this; their names must match :mod:`host.hookspecs`.
hookimpl = pluggy.HookimplMarker("host")

__all__ = ["__version__", "hookimpl"]
