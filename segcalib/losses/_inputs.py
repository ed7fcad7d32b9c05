"""One place that turns ``(logits, target)`` into what every loss needs: float logits, safe labels, a mask."""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

from segcalib.utils.tensors import HALF_DTYPES, as_label_map



class LossInputs:
    """A batch prepared for a loss (SPEC §0: every voxel is a sample).

    Attributes:
        source_logits: ``(B, C, *spatial)`` as given (half precision kept: for kernels that read it directly).
        dtype: the compute dtype, float32 for half-precision logits, else theirs.
        logits: ``(B, C, *spatial)``, float32 (half precision is promoted, lazily) or float64.
        target: ``(B, *spatial)`` int64 as given, ignored voxels still hold ``ignore_index``.
        valid: ``(B, *spatial)`` bool, False on ignored voxels (lazy: L1-ACE's kernels read the
            labels as they are).
        count: 0-d number of valid voxels, at least 1, so that every mean of an all-ignored batch
            is 0 with zero gradient instead of 0/0 (lazy).
        labels: ``target`` with ignored voxels set to 0, safe for ``gather`` and ``one_hot`` (lazy).
        weight: ``valid`` in the logits' dtype, 1 = counted, 0 = ignored (lazy).
    """

    def __init__(self, logits: Tensor, target: Tensor, ignore_index: int) -> None:
        if logits.dim() < 3:
            raise ValueError(f"logits must be (B, C, *spatial), got shape {tuple(logits.shape)}")
        if not logits.is_floating_point():
            raise TypeError(f"logits must be floating point, got {logits.dtype}")
        self.source_logits = logits
        self._grad_enabled = torch.is_grad_enabled()  # the promotion, done lazily, is recorded as if done here
        self.dtype = torch.float32 if logits.dtype in HALF_DTYPES else logits.dtype
        self.target = as_label_map(target, logits)
        self.ignore_index = ignore_index

    @cached_property
    def valid(self) -> Tensor:
        return self.target != self.ignore_index

    @cached_property
    def logits(self) -> Tensor:
        with torch.set_grad_enabled(self._grad_enabled):
            return self.source_logits.to(self.dtype)

    @cached_property
    def count(self) -> Tensor:
        return self.valid.sum().to(self.dtype).clamp_min(1.0)

    @cached_property
    def labels(self) -> Tensor:
        return torch.where(self.valid, self.target, 0)

    @cached_property
    def weight(self) -> Tensor:
        return self.valid.to(self.dtype)

    @property
    def num_classes(self) -> int:
        return self.source_logits.shape[1]

    @property
    def spatial_dims(self) -> int:
        return self.source_logits.dim() - 2

    def one_hot(self) -> Tensor:
        """``(B, C, *spatial)`` one-hot target in the logits' dtype, all zero on ignored voxels."""
        return torch.zeros_like(self.logits).scatter_(1, self.labels.unsqueeze(1), self.weight.unsqueeze(1))

    def mean(self, per_voxel: Tensor) -> Tensor:
        """Mean of a finite ``(B, *spatial)`` tensor over the valid voxels."""
        return torch.dot(per_voxel.reshape(-1), self.weight.reshape(-1)) / self.count

    def class_mean(self, per_entry: Tensor) -> Tensor:
        """Mean of a finite ``(B, C, *spatial)`` tensor over valid voxels x classes (SPEC's mean_{i,k})."""
        return self.mean(per_entry.sum(1)) / self.num_classes

    def cross_entropy(self) -> Tensor:
        """Mean NLL over the valid voxels."""
        nll = torch.nn.functional.cross_entropy(
            self.logits, self.target, ignore_index=self.ignore_index, reduction="sum"
        )
        return nll / self.count
