"""The interface of every post-hoc calibrator: stream batches in, fit once, transform any volume.

A calibrator maps logits ``(B, C, *spatial)`` to calibrated probabilities. Fitting is streamed:
``update()`` only adds to bounded statistics (a seeded voxel sample or fixed histograms), ``merge()``
adds another calibrator's statistics (other processes, other folds), ``fit()`` solves once. The
fitted state is plain numbers (:meth:`Calibrator.get_params`) plus, for the few methods that need
them, named tensors (:meth:`Calibrator.tensors`), so it is saved without pickle.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor

from segcalib.errors import ConfigError, DataError
from segcalib.inference.temperature import DEFAULT_MAX_VOXELS
from segcalib.utils.threads import cpu_threads

Spacing = Sequence[Sequence[float]] | None
# Numerically safe ranges of saved parameters (float32 maps, stable softmax): a temperature is a
# normal float32 far from under/overflow; affine weights and biases keep W x + b finite for logits
# up to ~1e30.
SAFE_TEMPERATURE = (1e-30, 1e30)
SAFE_AFFINE = (-1e6, 1e6)


class Calibrator(abc.ABC):
    """Post-hoc calibrator of ``num_classes``-class logits.

    Subclasses declare their hyperparameters as keyword arguments of ``__init__`` (with defaults) and
    pass them on to ``super().__init__(num_classes, seed=..., max_voxels=..., **hyperparameters)``;
    they implement :meth:`update`, :meth:`merge`, :meth:`reset`, :meth:`_fit`, :meth:`_transform`,
    :meth:`_state` and :meth:`_load_state`.

    Class attributes:
        name: registry name (set by :func:`~segcalib.calibrators.registry.register_calibrator`).
        preserves_argmax: the calibrated argmax equals the input argmax for every voxel (ties aside).
        preserves_order: the per-voxel order of the classes is unchanged (implies ``preserves_argmax``).
        parameter_ranges: ``{param: (low, high)}``, the closed range of every number of a saved
            parameter in which the transform is numerically safe (float32); a loaded file outside
            it is refused, naming the parameter.

    Attributes:
        input_space: what :meth:`transform` must be given, as recorded in ``calibrator.json``
            (``"logits"``, ``"log_probs"``, or None when unrecorded; set by ``load_calibrator``;
            see :mod:`segcalib.calibrators.input_space`).
    """

    name: ClassVar[str] = ""
    preserves_argmax: ClassVar[bool] = False
    preserves_order: ClassVar[bool] = False
    parameter_ranges: ClassVar[dict[str, tuple[float, float]]] = {}
    input_space: str | None = None

    def __init__(self, num_classes: int, *, seed: int = 0, max_voxels: int = DEFAULT_MAX_VOXELS, **params: Any) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(f"calibrator '{self.name}': num_classes must be an integer >= 2, got {num_classes!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"calibrator '{self.name}': seed must be an integer, got {seed!r}")
        if isinstance(max_voxels, bool) or not isinstance(max_voxels, int) or max_voxels < num_classes:
            raise ConfigError(
                f"calibrator '{self.name}': max_voxels must be an integer >= num_classes ({num_classes}), "
                f"got {max_voxels!r}"
            )
        self.num_classes = num_classes
        self.seed = seed
        self.max_voxels = max_voxels
        self.hyperparameters: dict[str, Any] = {"seed": seed, "max_voxels": max_voxels, **params}
        self.fitted = False

    # ----- streaming statistics -------------------------------------------------------------
    @abc.abstractmethod
    def update(
        self,
        logits: Tensor,
        target: Tensor,
        mask: Tensor | None = None,
        *,
        spacing: Spacing = None,
        image: Tensor | None = None,
    ) -> None:
        """Offer one batch: ``logits (B, C, *spatial)`` float, ``target (B, *spatial)`` int64 (or
        ``(B, 1, *spatial)``), ``mask (B, *spatial)`` bool = the fit region (None: every voxel),
        ``spacing`` in mm per case, ``image (B, Cin, *spatial)`` optional. For probability inputs pass
        ``log(p.clamp_min(1e-12))``. Adds only to bounded statistics."""

    @abc.abstractmethod
    def merge(self, other: "Calibrator") -> None:
        """Add ``other``'s statistics (same class, same ``num_classes``) to this calibrator's."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget every statistic and the fitted state."""

    # ----- fitting and applying ------------------------------------------------------------
    def fit(self) -> "Calibrator":
        """Fit on everything offered so far; returns ``self``.

        Raises:
            DataError: nothing (or nothing usable) was offered, e.g. an empty fit region.
        """
        with cpu_threads():
            self._fit()
        self.fitted = True
        return self

    def transform(self, logits: Tensor, *, spacing: Spacing = None, image: Tensor | None = None) -> Tensor:
        """Calibrated probabilities ``(B, C, *spatial)``, float32 on ``logits``' device, summing to 1
        over the class axis. ``logits`` is not modified."""
        self._check_fitted()
        self._check_logits(logits)
        return self._transform(logits.detach().float(), spacing=spacing, image=image)

    @abc.abstractmethod
    def _fit(self) -> None:
        """Solve for the parameters from the accumulated statistics."""

    @abc.abstractmethod
    def _transform(self, logits: Tensor, *, spacing: Spacing, image: Tensor | None) -> Tensor:
        """Probabilities from float32 ``logits (B, C, *spatial)`` (a fresh tensor may be reused in place
        only if the subclass made it)."""

    # ----- fitted state ---------------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        """Hyperparameters and fitted parameters as JSON-able plain numbers and lists."""
        self._check_fitted()
        return {**self.hyperparameters, **self._state()}

    def tensors(self) -> dict[str, Tensor]:
        """Fitted tensors too large for JSON (empty for most methods)."""
        self._check_fitted()
        return {}

    @classmethod
    def from_params(
        cls, num_classes: int, params: dict[str, Any], tensors: dict[str, Tensor] | None = None
    ) -> "Calibrator":
        """A fitted calibrator from :meth:`get_params` / :meth:`tensors` output.

        Raises:
            DataError: a parameter is missing or malformed (the message names it).
        """
        if not isinstance(params, dict):
            raise DataError(f"calibrator '{cls.name}': params must be a mapping, got {type(params).__name__}")
        from segcalib.calibrators.registry import calibrator_parameters  # registry imports this module

        hyper = {k: params[k] for k in calibrator_parameters(cls.name) if k in params}
        try:
            calibrator = cls(num_classes, **hyper)
        except ConfigError as exc:
            raise DataError(str(exc)) from None
        state = {k: v for k, v in params.items() if k not in hyper}
        calibrator._load_state(state, dict(tensors or {}))  # types and shapes first, then the ranges
        check_ranges(cls.name, state, cls.parameter_ranges)
        calibrator.fitted = True
        known = [*calibrator_parameters(cls.name), *calibrator._state()]
        for key in params:
            if key not in known:
                from segcalib.utils.names import unknown_name_message

                raise DataError(f"calibrator '{cls.name}': " + unknown_name_message("parameter", key, known))
        return calibrator

    def describe_params(self) -> str:
        """The fitted parameters in a few words (extremes of lists), for messages about a bad output."""
        parts = []
        for key, value in self._state().items():
            flat = None
            if isinstance(value, list):
                try:
                    flat = torch.tensor(value, dtype=torch.float64).flatten()
                except (TypeError, ValueError, RuntimeError):  # ragged lists (isotonic knots)
                    flat = torch.tensor([float(v) for v in _flatten_numbers(value)], dtype=torch.float64)
            if flat is not None and flat.numel() > 1:
                parts.append(f"{key} in [{float(flat.min()):.4g}, {float(flat.max()):.4g}]")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                parts.append(f"{key} = {value:.4g}")
        return ", ".join(parts) or "no numeric parameters"

    @abc.abstractmethod
    def _state(self) -> dict[str, Any]:
        """The fitted parameters as plain numbers / nested lists."""

    @abc.abstractmethod
    def _load_state(self, state: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        """Restore what :meth:`_state` (and :meth:`tensors`) returned; raise DataError on bad input."""

    # ----- checks shared by subclasses ----------------------------------------------------------
    def _check_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError(f"calibrator '{self.name}' is not fitted: call update(...) then fit() first")

    def _check_logits(self, logits: Tensor) -> None:
        if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() < 3:
            raise DataError(
                f"calibrator '{self.name}': logits must be a float tensor (B, C, *spatial), got "
                f"{getattr(logits, 'dtype', type(logits).__name__)} of shape {tuple(getattr(logits, 'shape', ()))}"
            )
        if logits.shape[1] != self.num_classes:
            raise DataError(
                f"calibrator '{self.name}': logits have {logits.shape[1]} classes on axis 1, the calibrator "
                f"{self.num_classes}"
            )

    def _check_mergeable(self, other: "Calibrator") -> None:
        if type(other) is not type(self) or other.num_classes != self.num_classes:
            raise ValueError(
                f"cannot merge {type(other).__name__}({other.num_classes} classes) into "
                f"{type(self).__name__}({self.num_classes} classes)"
            )


def check_positive_int(owner: str, key: str, value: Any) -> int:
    """``value`` if it is an integer >= 1 (ConfigError naming ``key`` otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"calibrator '{owner}': {key} must be an integer >= 1, got {value!r}")
    return value


def _flatten_numbers(value: Any) -> list[float]:
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in _flatten_numbers(item)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def check_ranges(owner: str, state: dict[str, Any], ranges: dict[str, tuple[float, float]]) -> None:
    """DataError naming the parameter when a number of ``state[key]`` (a number or nested lists)
    lies outside ``ranges[key]`` (the numerically safe range of the transform)."""
    for key, (low, high) in ranges.items():
        if key not in state:
            continue  # missing: the calibrator's own reader names it
        try:
            values = torch.tensor(state[key], dtype=torch.float64).flatten()
        except (TypeError, ValueError, RuntimeError):
            continue  # malformed: the calibrator's own reader names it
        bad = values[~((values >= low) & (values <= high))]
        if bad.numel():
            raise DataError(
                f"calibrator '{owner}': parameter '{key}' = {float(bad[0]):.4g} is outside [{low:g}, {high:g}], "
                "the range in which the calibrated maps are computed safely in float32"
            )


def read_float(owner: str, state: dict[str, Any], key: str, *, positive: bool = False) -> float:
    """``state[key]`` as a finite float (DataError naming ``key`` otherwise)."""
    value = state.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"calibrator '{owner}': parameter '{key}' must be a number, got {value!r}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")) or (positive and value <= 0):
        kind = "finite positive" if positive else "finite"
        raise DataError(f"calibrator '{owner}': parameter '{key}' must be a {kind} number, got {value!r}")
    return value


def read_array(owner: str, state: dict[str, Any], key: str, shape: tuple[int, ...]) -> Tensor:
    """``state[key]`` (nested lists) as a finite float64 tensor of ``shape`` (DataError otherwise)."""
    value = state.get(key)
    try:
        array = torch.tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise DataError(f"calibrator '{owner}': parameter '{key}' must be a list of numbers, got {value!r}") from None
    if tuple(array.shape) != shape or not torch.isfinite(array).all():
        raise DataError(
            f"calibrator '{owner}': parameter '{key}' must be finite numbers of shape {list(shape)}, "
            f"got shape {list(array.shape)}"
        )
    return array
