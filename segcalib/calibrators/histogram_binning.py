"""Histogram binning (Zadrozny & Elkan, ICML 2001), one-vs-rest per class, renormalised over classes.

For each class k the softmax probability ``p_k`` falls in one of ``n_bins`` equal-width bins (SPEC §3
binning, default 15 as the ECE); the calibrated value is the observed frequency of ``y == k`` among
the fit voxels in that bin. The per-class values are then divided by their sum over classes so that
each voxel's probabilities sum to 1. Bins without any fit voxel take the bin centre ``(b + 0.5)/M``;
a voxel whose values are all 0 keeps its uncalibrated softmax.

The fit is exact: it needs only the streamed per-(class, bin) counts and positives, so a stream of
batches gives the same bins as one batch. Neither the argmax nor the class order is preserved
(``preserves_argmax = preserves_order = False``): the map is a step function, ties and swaps occur.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from segcalib.calibrators._class_histograms import ClassHistograms, HistogramStatistics, bin_index, class_probabilities, renormalise
from segcalib.calibrators.base import Calibrator, Spacing, check_positive_int, read_array
from segcalib.calibrators.registry import register_calibrator
from segcalib.errors import DataError
from segcalib.inference.temperature import DEFAULT_MAX_VOXELS


@register_calibrator("histogram_binning")
class HistogramBinning(HistogramStatistics, Calibrator):
    """One-vs-rest histogram binning on softmax probabilities (``n_bins`` equal-width bins, default 15).

    Fitted parameters: ``bin_values`` ``(C, n_bins)``, the calibrated probability of class k in bin b
    before renormalisation. ``preserves_argmax = False``, ``preserves_order = False``.
    """

    preserves_argmax = False
    preserves_order = False

    def __init__(
        self, num_classes: int, *, seed: int = 0, max_voxels: int = DEFAULT_MAX_VOXELS, n_bins: int = 15
    ) -> None:
        super().__init__(num_classes, seed=seed, max_voxels=max_voxels, n_bins=n_bins)
        self.n_bins = check_positive_int(self.name, "n_bins", n_bins)
        self.histograms = ClassHistograms(num_classes, n_bins)
        self.bin_values: Tensor | None = None

    def _clear_fit(self) -> None:
        self.bin_values = None

    def _fit(self) -> None:
        h = self.histograms
        if h.total == 0:
            raise DataError("calibrator 'histogram_binning': no voxels were offered (empty fit region?)")
        centres = (torch.arange(self.n_bins, dtype=torch.float64) + 0.5) / self.n_bins
        frequency = h.positives / h.counts.clamp_min(1)
        self.bin_values = torch.where(h.counts > 0, frequency, centres.expand_as(frequency))

    def one_vs_rest(self, probs: Tensor) -> Tensor:
        """Per-class binned values ``(B, C, *S)`` (float64, before renormalisation) of softmax ``probs``."""
        assert self.bin_values is not None
        values = self.bin_values.to(probs.device)
        bins = bin_index(probs, self.n_bins).movedim(1, -1)  # (B, *S, C)
        rows = torch.arange(self.num_classes, device=probs.device)
        return values[rows, bins].movedim(-1, 1)

    def _transform(self, logits: Tensor, *, spacing: Spacing, image: Tensor | None) -> Tensor:
        p = class_probabilities(logits)
        return renormalise(self.one_vs_rest(p), p)

    def _state(self) -> dict[str, Any]:
        assert self.bin_values is not None
        return {"bin_values": self.bin_values.tolist()}

    def _load_state(self, state: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        values = read_array(self.name, state, "bin_values", (self.num_classes, self.n_bins))
        if bool(((values < 0) | (values > 1)).any()):
            raise DataError("calibrator 'histogram_binning': parameter 'bin_values' must lie in [0, 1]")
        self.bin_values = values
