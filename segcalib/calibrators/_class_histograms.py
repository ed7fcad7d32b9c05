"""Streamed one-vs-rest histograms of softmax probabilities, per class (histogram binning, isotonic).

Every voxel contributes, for every class k, its probability ``p_k = softmax(z)_k`` with the outcome
``[y == k]``. Bins are SPEC §3's equal-width bins ``b = clamp(ceil(p * M) - 1, 0, M - 1)`` (bins
``(b/M, (b+1)/M]``, ``p = 0`` in the first bin). Per (class, bin) the state keeps, in float64: the
voxel count, the number of positives and the sum of ``p_k``. The state merges by summation, so a
fit from a stream of batches equals a fit from one batch exactly (up to float64 summation order).

Probabilities are computed the same way at update and at transform time: the logits are cast to
float32 (what :meth:`Calibrator.transform` receives), then the softmax runs in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from segcalib.calibrators.sample import _labels_and_mask

_CHUNK_VOXELS = 2**16  # voxels per scatter (bounded temporaries: ~C * 0.5 MiB of int64 indices)


def class_probabilities(logits: Tensor) -> Tensor:
    """Float64 softmax over axis 1 of ``logits`` cast to float32 first (as transform sees them)."""
    return torch.softmax(logits.detach().float().double(), dim=1)


def bin_index(p: Tensor, n_bins: int) -> Tensor:
    """SPEC bin index ``clamp(ceil(p * n_bins) - 1, 0, n_bins - 1)`` (int64), in float64."""
    return (p.double() * n_bins).ceil_().sub_(1).clamp_(0, n_bins - 1).long()


class ClassHistograms:
    """Per-class counts, positives and probability sums in ``n_bins`` equal-width bins.

    Attributes:
        counts: float64 ``(C, n_bins)`` voxels per (class, bin).
        positives: float64 ``(C, n_bins)`` voxels with ``y == k`` per (class, bin).
        prob_sums: float64 ``(C, n_bins)`` sum of ``p_k`` per (class, bin).
    """

    def __init__(self, num_classes: int, n_bins: int) -> None:
        self.num_classes = num_classes
        self.n_bins = n_bins
        self.reset()

    def reset(self) -> None:
        """Zero every histogram."""
        shape = (self.num_classes, self.n_bins)
        self.counts = torch.zeros(shape, dtype=torch.float64)
        self.positives = torch.zeros(shape, dtype=torch.float64)
        self.prob_sums = torch.zeros(shape, dtype=torch.float64)

    @property
    def total(self) -> int:
        """Voxels offered so far."""
        return int(self.counts[0].sum())

    def update(self, logits: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        """Add the voxels of ``logits (B, C, *S)`` / ``target (B, *S)`` where ``mask (B, *S)``.

        Raises:
            DataError: bad shapes, or labels outside ``0..C-1`` inside the mask.
        """
        labels, keep = _labels_and_mask(logits, target, mask, self.num_classes)
        flat = logits.detach().reshape(logits.shape[0], self.num_classes, -1)  # a view: (B, C, S)
        per_case = flat.shape[2]
        device = flat.device
        offsets = torch.arange(self.num_classes, device=device) * self.n_bins
        size = self.num_classes * self.n_bins
        counts = torch.zeros(size, dtype=torch.float64, device=device)
        positives = torch.zeros_like(counts)
        sums = torch.zeros_like(counts)
        # chunks of one case's voxels: temporaries stay a few MiB whatever the volume
        for b in range(flat.shape[0]):
            for start in range(0, per_case, _CHUNK_VOXELS):
                stop = min(start + _CHUNK_VOXELS, per_case)
                inside = keep[b * per_case + start : b * per_case + stop].to(device)
                z = flat[b, :, start:stop].T[inside]
                y = labels[b * per_case + start : b * per_case + stop].to(device)[inside]
                p = torch.softmax(z.float().double(), dim=1)
                index = bin_index(p, self.n_bins) + offsets  # (n, C)
                counts += torch.bincount(index.reshape(-1), minlength=size).double()
                sums += torch.bincount(index.reshape(-1), weights=p.reshape(-1), minlength=size)
                own = index.gather(1, y.unsqueeze(1)).reshape(-1)
                positives += torch.bincount(own, minlength=size).double()
        self.counts += counts.view(self.num_classes, self.n_bins).cpu()
        self.positives += positives.view(self.num_classes, self.n_bins).cpu()
        self.prob_sums += sums.view(self.num_classes, self.n_bins).cpu()

    def merge(self, other: "ClassHistograms") -> None:
        """Add ``other``'s histograms (same classes and bins)."""
        if (other.num_classes, other.n_bins) != (self.num_classes, self.n_bins):
            raise ValueError(
                f"cannot merge histograms of {other.num_classes} classes x {other.n_bins} bins into "
                f"{self.num_classes} x {self.n_bins}"
            )
        self.counts += other.counts
        self.positives += other.positives
        self.prob_sums += other.prob_sums


def renormalise(values: Tensor, fallback: Tensor) -> Tensor:
    """``values (B, C, *S) / sum over C`` as float32; voxels whose sum is 0 take ``fallback``."""
    total = values.sum(dim=1, keepdim=True)
    empty = total <= 0
    out = torch.where(empty, fallback, values / torch.where(empty, torch.ones_like(total), total))
    return out.float()


class HistogramStatistics:
    """Mixin of the calibrators whose statistics are :class:`ClassHistograms` (``self.histograms``):
    streaming ``update`` / ``merge`` / ``reset``; subclasses clear their fit in ``_clear_fit``."""

    histograms: ClassHistograms

    def update(self, logits: Tensor, target: Tensor, mask: Tensor | None = None, *, spacing=None, image=None) -> None:
        self._check_logits(logits)  # type: ignore[attr-defined]
        self.histograms.update(logits, target, mask)

    def merge(self, other) -> None:
        self._check_mergeable(other)  # type: ignore[attr-defined]
        self.histograms.merge(other.histograms)

    def reset(self) -> None:
        self.histograms.reset()
        self._clear_fit()
        self.fitted = False

    def _clear_fit(self) -> None:
        raise NotImplementedError
