"""Losses by name: ``@register_loss("name")`` on the class, ``build_loss(name, **params)`` to make one.

Adding a loss is one new module and one decorator line; the constructor's keyword parameters and
their defaults are the single source of truth for :func:`loss_parameters` and for validation.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from torch import nn

from segcalib.errors import ConfigError
from segcalib.utils.names import Registry, unknown_name_message

if TYPE_CHECKING:
    from segcalib.losses.base import CalibrationLoss


class _Required:
    """Marker for a parameter without default (e.g. ``num_classes``: the config fills it from the data)."""

    _instance: "_Required | None" = None

    def __new__(cls) -> "_Required":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Value of a required parameter in :func:`loss_parameters`."""

_REGISTRY: Registry[type[nn.Module]] = Registry("loss")
_T = TypeVar("_T", bound=type[nn.Module])


def register_loss(name: str) -> Callable[[_T], _T]:
    """Class decorator: make the loss available as ``build_loss(name, ...)``."""

    def decorate(cls: _T) -> _T:
        _REGISTRY.register(name, cls)
        cls.loss_name = name  # type: ignore[attr-defined]
        return cls

    return decorate


def list_losses() -> list[str]:
    """Registered loss names, sorted."""
    return sorted(_REGISTRY)


def _loss_class(name: str) -> type[nn.Module]:
    return _REGISTRY.lookup(name)


def loss_parameters(name: str) -> dict[str, Any]:
    """The keyword parameters of loss ``name`` and their defaults (:data:`REQUIRED` when there is none)."""
    return _constructor_parameters(_loss_class(name))


def _constructor_parameters(cls: type[nn.Module]) -> dict[str, Any]:
    """Keyword parameters of ``cls.__init__``; a constructor with ``**params`` passes them on to
    its base class, whose parameters count too (a subclass lists only what it adds)."""
    if cls is nn.Module:
        return {}
    signature = inspect.signature(cls.__init__)
    own = {
        p.name: REQUIRED if p.default is inspect.Parameter.empty else p.default
        for p in signature.parameters.values()
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) and p.name != "self"
    }
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return {**_constructor_parameters(cls.__mro__[1]), **own}
    return own


def check_loss_params(name: str, params: dict[str, Any], allow_missing: bool = False) -> None:
    """ConfigError naming ``loss.<key>`` for an unknown loss, an unknown parameter or (unless
    ``allow_missing``, for configs whose data-given parameters are filled later) a missing one.
    The one place loss parameters are checked: configs and :func:`build_loss` both call it."""
    _REGISTRY.lookup(name, "loss.name")
    valid = loss_parameters(name)
    listed = ", ".join(valid) or "none"
    for key in params:
        if key not in valid:
            raise ConfigError(f"loss.{key}: " + unknown_name_message("parameter", key, valid, f"loss {name!r}"))
    if not allow_missing:
        for key, default in valid.items():
            if default is REQUIRED and key not in params:
                raise ConfigError(f"loss.{key}: missing required parameter {key!r} of loss {name!r}; valid parameters: {listed}")


def build_loss(name: str, **params: Any) -> "CalibrationLoss":
    """Make loss ``name`` with ``params`` (SPEC defaults for the rest).

    Raises:
        ConfigError: unknown loss, unknown parameter, missing required parameter or invalid value;
            the message names the loss and the parameter and lists the valid ones.
    """
    check_loss_params(name, params)
    return _loss_class(name)(**params)
