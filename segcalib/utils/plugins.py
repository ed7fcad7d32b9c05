"""Registries fill themselves: a package imports each of its public modules, whose decorators
(``@register_loss``, ``@register_model``, ``@register_calibrator``) add what they define, so adding
one is one new file."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Collection, Iterable


def import_submodules(package: str, path: Iterable[str], framework: Collection[str] = ()) -> list[str]:
    """Import every module of ``package`` (its ``__path__`` is ``path``) whose name does not start
    with ``_`` and is not in ``framework``; returns their names, sorted."""
    names = sorted(m.name for m in pkgutil.iter_modules(path) if not m.name.startswith("_") and m.name not in framework)
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names
