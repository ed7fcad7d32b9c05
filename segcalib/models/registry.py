"""The model registry: networks are created by name (as ``smp.create_model`` / timm do).

A builder is a function ``builder(spatial_dims, in_channels, out_channels, **params) -> nn.Module``
registered with :func:`register_model`; adding a model is one function plus its decorator.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from segcalib.errors import ConfigError
from segcalib.utils.names import Registry, unknown_name_message

Builder = Callable[..., nn.Module]
_DATA_ARGS = ("spatial_dims", "in_channels", "out_channels")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Builder
    spatial_dims: tuple[int, ...]
    size_divisor: Callable[[dict[str, Any]], int]
    description: str


_REGISTRY: Registry[ModelEntry] = Registry("model")


def register_model(
    name: str,
    spatial_dims: tuple[int, ...] = (2, 3),
    size_divisor: Callable[[dict[str, Any]], int] = lambda params: 1,
) -> Callable[[Builder], Builder]:
    """Register ``builder`` under ``name``; ``size_divisor(params)`` is the factor every input
    side must be a multiple of (the sliding-window ROI and training patches are checked)."""

    def decorator(builder: Builder) -> Builder:
        doc = (inspect.getdoc(builder) or "").splitlines()
        _REGISTRY.register(name, ModelEntry(name, builder, spatial_dims, size_divisor, doc[0] if doc else ""))
        return builder

    return decorator


def list_models(spatial_dims: int | None = None) -> list[str]:
    """Registered model names (optionally only those for 2 or 3 spatial dims)."""
    return sorted(n for n, e in _REGISTRY.items() if spatial_dims is None or spatial_dims in e.spatial_dims)


def get_entry(name: str) -> ModelEntry:
    return _REGISTRY.lookup(name, "model.name")


def model_parameters(name: str) -> dict[str, Any]:
    """The builder's tunable keyword parameters and their defaults (data-given ones excluded)."""
    signature = inspect.signature(get_entry(name).builder)
    return {
        p.name: p.default
        for p in signature.parameters.values()
        if p.name not in _DATA_ARGS and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def check_model_params(name: str, spatial_dims: int, params: dict[str, Any]) -> None:
    """Raise ConfigError for an unknown model, parameter or a wrong number of spatial dims."""
    entry = get_entry(name)
    if spatial_dims not in entry.spatial_dims:
        dims = " or ".join(f"{d}D" for d in entry.spatial_dims)
        raise ConfigError(f"model.name: {name!r} is a {dims} model but the data mode is {spatial_dims}D")
    allowed = model_parameters(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        message = unknown_name_message("parameter", unknown[0], allowed, f"model {name!r}")
        raise ConfigError(f"model.{unknown[0]}: {message}")


def build_model(name: str, spatial_dims: int, in_channels: int, out_channels: int, **params: Any) -> nn.Module:
    """Create the registered network ``name`` for ``(B, in_channels, *spatial)`` inputs that
    returns logits ``(B, out_channels, *spatial)``."""
    check_model_params(name, spatial_dims, params)
    try:
        return get_entry(name).builder(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **params
        )
    except (TypeError, ValueError, AssertionError, KeyError) as exc:
        raise ConfigError(f"model: cannot build {name!r} with {params}: {exc}") from exc


def size_divisor(name: str, params: dict[str, Any]) -> int:
    return int(get_entry(name).size_divisor({**model_parameters(name), **params}))
