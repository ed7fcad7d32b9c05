"""A bounded, seeded voxel sample stratified by ground-truth class, and the calibrators fitted on it.

Each class k keeps a reservoir of at most ``max_voxels // C`` voxels, chosen by random keys (the
voxels with the largest keys among all offered ones, as in
:class:`segcalib.inference.temperature.VoxelSample`), so memory is flat in the number of cases and a
rare foreground class is not crowded out by background. Every kept voxel of class k stands for
``offered_k / kept_k`` offered voxels: the weighted mean NLL over the sample is an unbiased estimate
of the mean NLL over every offered voxel, and equals it exactly while nothing was dropped.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch
from torch import Tensor

from segcalib.calibrators.base import Calibrator, Spacing
from segcalib.errors import DataError
from segcalib.inference.temperature import DEFAULT_MAX_VOXELS
from segcalib.utils.tensors import as_label_map


class StratifiedSample:
    """Per-class reservoirs of logits rows ``(n_k, C)`` float32 on the CPU, with their offered counts."""

    def __init__(self, num_classes: int, max_voxels: int = DEFAULT_MAX_VOXELS, seed: int = 0) -> None:
        self.num_classes = num_classes
        self.max_voxels = max_voxels
        self.capacity = max(1, max_voxels // num_classes)
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)
        self.logits = [torch.empty(0, num_classes) for _ in range(num_classes)]
        self.keys = [torch.empty(0) for _ in range(num_classes)]
        self.offered = torch.zeros(num_classes, dtype=torch.int64)

    def __len__(self) -> int:
        return sum(int(z.shape[0]) for z in self.logits)

    @property
    def total_offered(self) -> int:
        return int(self.offered.sum())

    def add(self, logits: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        """Offer the voxels of ``logits (B, C, *S)`` / ``target (B, *S)`` where ``mask (B, *S)`` is true.

        Candidates are chosen on the logits' device; only voxels that can enter a reservoir (key above
        its current smallest when full) are copied to the host, with one float32 key per voxel.
        """
        labels, keep = _region_labels(logits, target, mask, self.num_classes)  # on the logits' device
        keys = torch.rand(labels.shape[0], generator=self._generator)  # CPU: the same sample on any device
        device_keys = keys.to(labels.device)
        flat = logits.detach().reshape(logits.shape[0], self.num_classes, -1)  # a view: (B, C, S)
        per_case = flat.shape[2]
        for k in range(self.num_classes):
            in_class = keep & (labels == k)
            count = int(in_class.sum())
            if count == 0:
                continue
            self.offered[k] += count
            candidates = in_class
            if self.keys[k].shape[0] >= self.capacity:
                candidates = in_class & (device_keys > float(self.keys[k].min()))
            index = candidates.nonzero().squeeze(1)
            if index.numel() > self.capacity:  # only the largest keys can survive
                index = index[torch.topk(device_keys[index], self.capacity, sorted=False).indices.sort().values]
            rows = flat[index // per_case, :, index % per_case].float().cpu()
            self._insert(k, rows, keys[index.cpu()])

    def _insert(self, k: int, rows: Tensor, keys: Tensor) -> None:
        z = torch.cat([self.logits[k], rows])
        key = torch.cat([self.keys[k], keys])
        if key.shape[0] > self.capacity:
            top = torch.topk(key, self.capacity, sorted=False).indices.sort().values
            z, key = z[top], key[top]
        self.logits[k], self.keys[k] = z, key

    def merge(self, other: "StratifiedSample") -> None:
        """Add ``other``'s reservoirs and counts: the union's largest keys form a sample of the union.

        Samples filled in different processes should use different seeds (e.g. ``seed + rank``): with
        equal seeds their keys repeat, which keeps every voxel's chance equal (the weighted NLL stays
        unbiased) but makes the kept voxels of the two processes correlated."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge a {other.num_classes}-class sample into a {self.num_classes}-class one")
        for k in range(self.num_classes):
            self._insert(k, other.logits[k], other.keys[k])
        self.offered += other.offered

    def shrink(self, max_voxels: int) -> None:
        """Keep at most ``max_voxels // num_classes`` voxels per class: the largest keys, so what is left is
        itself a stratified random sample of everything offered (the offered counts, and so the weights'
        meaning, are unchanged)."""
        capacity = max(1, max_voxels // self.num_classes)
        for k in range(self.num_classes):
            if self.keys[k].shape[0] > capacity:
                top = torch.topk(self.keys[k], capacity, sorted=False).indices.sort().values
                self.logits[k], self.keys[k] = self.logits[k][top], self.keys[k][top]
        self.capacity = min(self.capacity, capacity)
        self.max_voxels = min(self.max_voxels, max_voxels)

    def data(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(logits (N, C) float32, labels (N,) int16 (int64 from 2^15 classes), weights (N,) float32)``,
        weights = offered_k / kept_k. The reservoirs become views of the returned logits, so the sample
        is not held twice while a fit runs."""
        kept = [int(z.shape[0]) for z in self.logits]
        logits = torch.cat(self.logits)
        self.logits = list(logits.split(kept))
        label_dtype = torch.int16 if self.num_classes < 2**15 else torch.int64
        labels = torch.cat([torch.full((n,), k, dtype=label_dtype) for k, n in enumerate(kept)])
        weights = torch.cat(
            [torch.full((n,), float(self.offered[k]) / n, dtype=torch.float32) for k, n in enumerate(kept) if n]
            or [torch.empty(0)]
        )
        return logits, labels, weights


def _labels_and_mask(logits: Tensor, target: Tensor, mask: Tensor | None, num_classes: int) -> tuple[Tensor, Tensor]:
    """Flat CPU labels ``(B*S,)`` and fit-region mask ``(B*S,)`` with the checks every update needs."""
    labels, keep = _region_labels(logits, target, mask, num_classes)
    return labels.cpu(), keep.cpu()


def _region_labels(logits: Tensor, target: Tensor, mask: Tensor | None, num_classes: int) -> tuple[Tensor, Tensor]:
    """As :func:`_labels_and_mask`, on the logits' device (no label map copied to the host)."""
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() < 3:
        shape = tuple(getattr(logits, "shape", ()))
        raise DataError(f"logits must be a float tensor (B, C, *spatial), got shape {shape}")
    if logits.shape[1] != num_classes:
        raise DataError(f"logits have {logits.shape[1]} classes on axis 1, the calibrator {num_classes}")
    try:
        labels = as_label_map(target, logits)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    labels = labels.reshape(-1).to(logits.device)
    if mask is None:
        keep = torch.ones_like(labels, dtype=torch.bool)
    else:
        if tuple(mask.shape) != (logits.shape[0], *logits.shape[2:]):
            raise DataError(
                f"mask shape {tuple(mask.shape)} does not match (B, *spatial) of logits {tuple(logits.shape)}"
            )
        keep = mask.reshape(-1).to(logits.device).bool()
    outside = keep & ((labels < 0) | (labels >= num_classes))
    if outside.any():
        bad = labels[outside].unique()[:5].tolist()
        raise DataError(
            f"target holds labels {bad} outside 0..{num_classes - 1} inside the fit region; exclude them with the mask"
        )
    return labels, keep


class SampledCalibrator(Calibrator):
    """A calibrator fitted on a :class:`StratifiedSample`: subclasses implement :meth:`_fit_sample`.

    ``fit_voxels`` (class attribute): when set, the fit uses at most that many voxels of the sample (a
    stratified random subsample, :meth:`StratifiedSample.shrink`), for models of a few parameters whose
    estimate does not move beyond that while each pass over the sample is costly.
    """

    fit_voxels: ClassVar[int | None] = None

    def __init__(self, num_classes: int, *, seed: int = 0, max_voxels: int = DEFAULT_MAX_VOXELS, **params: Any) -> None:
        super().__init__(num_classes, seed=seed, max_voxels=max_voxels, **params)
        self.sample = StratifiedSample(num_classes, max_voxels, seed)

    def update(
        self,
        logits: Tensor,
        target: Tensor,
        mask: Tensor | None = None,
        *,
        spacing: Spacing = None,
        image: Tensor | None = None,
    ) -> None:
        """Offer one batch to the sample (``spacing`` and ``image`` are not used by these methods)."""
        try:
            self.sample.add(logits, target, mask)
        except DataError as exc:
            raise DataError(f"calibrator '{self.name}': {exc}") from None

    def merge(self, other: Calibrator) -> None:
        self._check_mergeable(other)
        assert isinstance(other, SampledCalibrator)
        self.sample.merge(other.sample)

    def reset(self) -> None:
        self.sample = StratifiedSample(self.num_classes, self.max_voxels, self.seed)
        self.fitted = False

    def _fit(self) -> None:
        if self.fit_voxels is not None and len(self.sample) > self.fit_voxels:
            self.sample.shrink(self.fit_voxels * self.sample.num_classes // self.num_classes)
        logits, labels, weights = self.sample.data()
        if logits.shape[0] == 0:
            raise DataError(f"calibrator '{self.name}': no voxels to fit on (is the fit region empty?)")
        if not torch.isfinite(logits).all():
            raise DataError(f"calibrator '{self.name}': the fit region holds non-finite logits (NaN or inf)")
        self._fit_sample(logits, labels, weights)

    @abc.abstractmethod
    def _fit_sample(self, logits: Tensor, labels: Tensor, weights: Tensor) -> None:
        """Fit on ``logits (N, C)`` float32, ``labels (N,)`` int16, ``weights (N,)`` float32 (weighted mean
        NLL; :func:`~segcalib.calibrators._lbfgs.minimize_nll` takes them as they are)."""
