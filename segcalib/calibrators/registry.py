"""Calibrators by name: ``@register_calibrator("name")`` on the class, ``build_calibrator(name, C, **params)``.

Adding a calibrator is one new module in this package and one decorator line; the constructor's
keyword parameters and their defaults are the single source of truth for validation.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, TypeVar

from segcalib.calibrators.base import Calibrator
from segcalib.errors import ConfigError
from segcalib.utils.names import Registry, unknown_name_message

_REGISTRY: Registry[type[Calibrator]] = Registry("calibrator")
_T = TypeVar("_T", bound=type[Calibrator])


def register_calibrator(name: str) -> Callable[[_T], _T]:
    """Class decorator: make the calibrator available as ``build_calibrator(name, ...)``."""

    def decorate(cls: _T) -> _T:
        _REGISTRY.register(name, cls)
        cls.name = name
        return cls

    return decorate


def list_calibrators() -> list[str]:
    """Registered calibrator names, sorted."""
    return sorted(_REGISTRY)


def calibrator_class(name: str) -> type[Calibrator]:
    """The class registered as ``name`` (UnknownNameError, a ConfigError, listing the valid names otherwise)."""
    return _REGISTRY.lookup(name)


def calibrator_parameters(name: str) -> dict[str, Any]:
    """The keyword parameters of calibrator ``name`` (besides ``num_classes``) and their defaults."""
    signature = inspect.signature(calibrator_class(name).__init__)
    return {
        p.name: p.default
        for p in signature.parameters.values()
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        and p.name not in ("self", "num_classes")
    }


def build_calibrator(name: str, num_classes: int, **params: Any) -> Calibrator:
    """Make an unfitted calibrator ``name`` for ``num_classes`` classes with ``params`` (defaults for the rest).

    Raises:
        ConfigError: unknown calibrator, unknown parameter or invalid value; the message names them.
    """
    cls = calibrator_class(name)
    valid = calibrator_parameters(name)
    for key in params:
        if key not in valid:
            raise ConfigError(f"calibrator '{name}': " + unknown_name_message("parameter", key, valid))
    return cls(num_classes, **params)
