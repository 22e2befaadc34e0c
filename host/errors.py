"""Errors the CLI turns into a one-paragraph message and exit code 2, never a traceback."""

from __future__ import annotations


class HostError(Exception):
    """A problem the user can fix; the message names the file/key/row and the fix."""


class ConfigError(HostError):
    """The YAML is unreadable or invalid, or keys combine in an impossible way."""


class PluginError(HostError):
    """A plugin is unknown, fails to import, breaks the hook contract or lacks a required plugin."""


class DataError(HostError):
    """A dataset file, column or row cannot be used as configured."""
