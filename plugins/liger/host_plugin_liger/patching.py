"""Apply liger-kernel's ``apply_liger_kernel_to_<family>`` and remember everything it changed.

liger-kernel patches at module level: it replaces classes and functions in the family's
``modeling_*`` module (and, for some keys, ``torch.nn`` / ``torch.nn.functional`` themselves) so the
model built next uses its kernels. Those changes are process-wide, so this module diffs the
namespaces liger may touch before and after the call: the diff is what the plugin checks against
what it declared (a declared patch that did not happen is an error, never a silent no-op) and what
:func:`restore` puts back when training ends.
"""

from __future__ import annotations

import importlib
from typing import Any

from host.errors import HostError
from host_plugin_liger.families import Family, liger_kwargs

_MISSING = object()
#: (owner, attribute, value before the plugin patched it), oldest first
_SAVED: list[tuple[Any, str, Any]] = []


def _owners(family: Family) -> list[Any]:
    import torch

    modules = [importlib.import_module(m) for m in (family.module, *family.extra_modules)]
    classes = [
        obj for mod in modules for obj in vars(mod).values()
        if isinstance(obj, type) and obj.__module__ == mod.__name__
    ]
    return [*modules, *classes, torch.nn, torch.nn.functional]


def _diff(before: dict[int, tuple[Any, dict]]) -> list[tuple[Any, str, Any]]:
    changed = []
    for owner, old in before.values():
        new = vars(owner)
        for name in set(old) | set(new):
            if old.get(name, _MISSING) is not new.get(name, _MISSING):
                changed.append((owner, name, old.get(name, _MISSING)))
    return changed


def qualname(owner: Any, name: str) -> str:
    prefix = owner.__name__ if not isinstance(owner, type) else f"{owner.__module__}.{owner.__qualname__}"
    return f"{prefix}.{name}"


def apply(family: Family, enabled: dict[str, bool], experts_owner: str | None = None) -> set[str]:
    """Run liger's patch function for ``family`` with every patch explicitly on or off.

    ``enabled`` is the resolved plan (:func:`host_plugin_liger.families.resolve`). With
    ``liger_glu_activation`` on an MoE family, the dense MLP / shared-expert classes
    (``family.dense_glu``) become liger's SwiGLU MLP here (liger-kernel's own switch covers only the
    routed experts, and only when ``experts_owner`` is None).

    Returns the dotted names that changed. Raises HostError if liger-kernel cannot patch this
    transformers version (an import error or an exception inside liger).
    """
    before = {id(o): (o, dict(vars(o))) for o in _owners(family)}
    try:
        patch = getattr(importlib.import_module("liger_kernel.transformers.monkey_patch"), family.apply_fn)
        patch(**liger_kwargs(family, enabled, experts_owner))
        if enabled["liger_glu_activation"] and family.dense_glu:
            from liger_kernel.transformers.swiglu import LigerQwen3MoeSwiGLUMLP

            module = importlib.import_module(family.module)
            for cls in family.dense_glu:
                setattr(module, cls, LigerQwen3MoeSwiGLUMLP)
    except Exception as exc:  # liger raises ImportError/AttributeError/NotImplementedError on a mismatch
        _SAVED.extend(_diff(before))
        restore()
        raise HostError(
            f"liger: liger-kernel's {family.apply_fn} failed with this transformers version: "
            f"{type(exc).__name__}: {exc}. Turn the liger_* keys off or install a liger-kernel release that "
            f"supports it."
        ) from exc
    changed = _diff(before)
    _SAVED.extend(changed)
    return {qualname(o, n) for o, n, _ in changed}


def wrap(owner: Any, name: str, new: Any) -> None:
    """Replace ``owner.name`` with ``new``, remembered for :func:`restore`."""
    _SAVED.append((owner, name, vars(owner).get(name, _MISSING)))
    setattr(owner, name, new)


def restore() -> None:
    """Undo every patch made through this module, newest first (idempotent)."""
    while _SAVED:
        owner, name, old = _SAVED.pop()
        if old is _MISSING:
            try:
                delattr(owner, name)
            except AttributeError:
                pass
        else:
            setattr(owner, name, old)
