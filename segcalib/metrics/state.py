"""Declared, summable metric state (the torchmetrics ``add_state(..., dist_reduce_fx="sum")`` idea).

A metric declares its state tensors once with :meth:`SummableState.add_state`; ``update`` only adds
to them and ``compute`` only reads them. Merging two metrics, reducing across processes and
resetting then follow for every declared tensor alike.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

import torch

from segcalib.metrics.inputs import case_samples, check_probs_target
from segcalib.utils.distributed import all_reduce_sum, is_distributed

_Metric = TypeVar("_Metric", bound="SummableState")


class SummableState:
    """Float64 state tensors that combine by summation (batches, volumes, processes)."""

    def __init__(self) -> None:
        self._state_shapes: dict[str, tuple[int, ...]] = {}
        self._device = torch.device("cpu")

    def add_state(self, name: str, shape: tuple[int, ...]) -> None:
        """Declare a zero-initialised float64 state tensor ``name`` of ``shape``."""
        if name in self._state_shapes:
            raise ValueError(f"state {name!r} is already declared")
        self._state_shapes[name] = tuple(shape)
        setattr(self, name, torch.zeros(shape, dtype=torch.float64, device=self._device))

    @property
    def state_names(self) -> list[str]:
        return list(self._state_shapes)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The declared state tensors by name (the live tensors, not copies)."""
        return {name: getattr(self, name) for name in self._state_shapes}

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device: torch.device | str) -> SummableState:
        """Move the state to ``device`` (in place; returns ``self``)."""
        self._device = torch.device(device)
        for name in self._state_shapes:
            setattr(self, name, getattr(self, name).to(self._device))
        return self

    def _config(self) -> Any:
        """What must agree for two metrics' states to add up (the constructor's arguments)."""
        raise NotImplementedError(f"{type(self).__name__} does not say what must agree to merge")

    def merge(self: _Metric, other: _Metric) -> _Metric:
        """Add ``other``'s state (same class, same configuration) to this one; returns ``self``."""
        if not isinstance(other, type(self)) or other._config() != self._config():
            raise ValueError(f"can only merge {type(self).__name__} objects with the same configuration")
        self.merge_state(other)
        return self

    def reset(self) -> None:
        """Zero the state."""
        self.reset_state()

    def reset_state(self) -> None:
        for name in self._state_shapes:
            getattr(self, name).zero_()

    def add_to_state(self, values: dict[str, torch.Tensor]) -> None:
        """Add tensors shaped like the declared state (missing names add nothing)."""
        for name, value in values.items():
            getattr(self, name).add_(value.to(self._device, torch.float64))

    def merge_state(self, other: SummableState) -> None:
        if other._state_shapes != self._state_shapes:
            raise ValueError("cannot merge metrics with different state shapes")
        self.add_to_state(other.state_tensors())

    def reduced_state_copy(self) -> dict[str, torch.Tensor]:
        """Every state tensor summed over all processes, in one collective, as new tensors (the
        local state is left as it is, so ``compute`` can be called again after more updates)."""
        names = self.state_names
        flat = torch.cat([getattr(self, n).reshape(-1) for n in names])
        if is_distributed():
            all_reduce_sum(flat)
        out, offset = {}, 0
        for name in names:
            shape = self._state_shapes[name]
            size = math.prod(shape)
            out[name] = flat[offset : offset + size].view(shape)
            offset += size
        return out


class CaseSampleState(SummableState):
    """A streaming metric whose state is a statistic of each case's (score, outcome) samples
    (top-label confidence and correctness, or per class ``p_k`` and ``[y == k]``): ``update``
    validates, then adds ``_case_statistics(scores, outcomes)`` for every case."""

    num_classes: int
    mode: str
    classes: slice

    @torch.no_grad()
    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``probs (B, C, *spatial)``, ``target (B, *spatial)`` or ``(B, 1, *spatial)``."""
        probs, labels = check_probs_target(probs, target, self.num_classes)
        if probs.device != self.device:
            self.to(probs.device)
        for scores, outcomes in case_samples(probs, labels, self.mode, self.classes):
            self.add_to_state(self._case_statistics(scores, outcomes))

    def _case_statistics(self, scores: torch.Tensor, outcomes: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError
