"""Isotonic regression (Zadrozny & Elkan, KDD 2002), one-vs-rest per class, renormalised over classes.

For each class k a non-decreasing map ``g_k`` from ``p_k = softmax(z)_k`` to the frequency of
``y == k`` is fitted by pool-adjacent-violators (PAV), then each voxel's ``g_k(p_k)`` are divided by
their sum over classes (a voxel whose values are all 0 keeps its uncalibrated softmax).

Streaming and its approximation: the fit reads only a fine per-class histogram of ``p_k``
(``n_fine`` equal-width bins, default 4096, SPEC §3 binning): count, positives and sum of ``p_k``
per bin. Each non-empty bin becomes one point at the mean ``p_k`` of its voxels, weighted by its
count. The result is *exactly* what ``sklearn.isotonic.IsotonicRegression(out_of_bounds="clip")``
fits when every voxel's probability is moved to its bin's mean probability -- a move of less than
one bin width, ``1 / n_fine`` (2.4e-4 by default); the tests check this to 1e-9. Against the fit
on the unrounded probabilities there is no worst-case pointwise bound (voxels of one fine bin must
share a value, and a few adversarial voxels in one bin can move a pooled block), but the inputs
differ by less than a bin width: on 60 000 smoothly miscalibrated voxels the tests measure a mean
absolute difference of 7.5e-4 and a maximum of 0.034 at a step of the fit (asserted: < 1e-3 and < 0.05;
``tests/calibrators/test_nonparametric.py``).
Predictions interpolate linearly between the fitted points (clipped outside them), as scikit-learn does.

The map is monotone per class, but renormalisation can swap classes, so neither the argmax nor the
order is preserved (``preserves_argmax = preserves_order = False``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from segcalib.calibrators._class_histograms import ClassHistograms, HistogramStatistics, class_probabilities, renormalise
from segcalib.calibrators.base import Calibrator, Spacing
from segcalib.calibrators.registry import register_calibrator
from segcalib.errors import ConfigError, DataError
from segcalib.inference.temperature import DEFAULT_MAX_VOXELS


def pool_adjacent_violators(y: Tensor, w: Tensor) -> Tensor:
    """The non-decreasing sequence minimising ``sum w (fit - y)^2`` (float64 ``(n,)`` inputs, ``w > 0``)."""
    values: list[float] = []
    weights: list[float] = []
    sizes: list[int] = []
    for yi, wi in zip(y.tolist(), w.tolist()):
        values.append(yi)
        weights.append(wi)
        sizes.append(1)
        while len(values) > 1 and values[-2] >= values[-1]:
            total = weights[-2] + weights[-1]
            values[-2] = (values[-2] * weights[-2] + values[-1] * weights[-1]) / total
            weights[-2] = total
            sizes[-2] += sizes[-1]
            del values[-1], weights[-1], sizes[-1]
    return torch.repeat_interleave(torch.tensor(values, dtype=torch.float64), torch.tensor(sizes))


def _block_ends(fit: Tensor) -> Tensor:
    """Boolean mask keeping the first and last point of every constant run of ``fit``."""
    keep = torch.ones_like(fit, dtype=torch.bool)
    if fit.numel() > 2:
        same_prev = fit[1:-1] == fit[:-2]
        same_next = fit[1:-1] == fit[2:]
        keep[1:-1] = ~(same_prev & same_next)
    return keep


def interpolate(p: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Piecewise-linear ``y(x)`` at ``p`` (clipped outside ``[x[0], x[-1]]``), like ``numpy.interp``."""
    if x.numel() == 1:
        return torch.full_like(p, float(y[0]))
    i = torch.searchsorted(x, p.contiguous()).clamp_(1, x.numel() - 1)
    x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
    t = ((p - x0) / (x1 - x0)).clamp_(0, 1)
    return y0 + t * (y1 - y0)


@register_calibrator("isotonic")
class Isotonic(HistogramStatistics, Calibrator):
    """One-vs-rest isotonic regression on softmax probabilities, fitted from ``n_fine``-bin histograms.

    Fitted parameters: per class the knots ``x[k]`` (mean probability of the fine bins that start or
    end a constant run) and their values ``y[k]``. ``preserves_argmax = False``,
    ``preserves_order = False``.
    """

    preserves_argmax = False
    preserves_order = False

    def __init__(
        self, num_classes: int, *, seed: int = 0, max_voxels: int = DEFAULT_MAX_VOXELS, n_fine: int = 4096
    ) -> None:
        super().__init__(num_classes, seed=seed, max_voxels=max_voxels, n_fine=n_fine)
        if isinstance(n_fine, bool) or not isinstance(n_fine, int) or not 1 <= n_fine <= 2**20:
            raise ConfigError(f"calibrator 'isotonic': n_fine must be an integer in [1, 2^20], got {n_fine!r}")
        self.n_fine = n_fine
        self.histograms = ClassHistograms(num_classes, n_fine)
        self.knots: list[tuple[Tensor, Tensor]] = []

    def _clear_fit(self) -> None:
        self.knots = []

    def _fit(self) -> None:
        h = self.histograms
        if h.total == 0:
            raise DataError("calibrator 'isotonic': no voxels were offered (empty fit region?)")
        self.knots = []
        for k in range(self.num_classes):
            used = h.counts[k] > 0
            count = h.counts[k][used]
            x = h.prob_sums[k][used] / count
            fit = pool_adjacent_violators(h.positives[k][used] / count, count)
            keep = _block_ends(fit)
            self.knots.append((x[keep], fit[keep]))

    def one_vs_rest(self, probs: Tensor) -> Tensor:
        """Per-class isotonic values ``(B, C, *S)`` (float64, before renormalisation) of softmax ``probs``."""
        out = torch.empty_like(probs, dtype=torch.float64)
        for k, (x, y) in enumerate(self.knots):
            out[:, k] = interpolate(probs[:, k].double(), x.to(probs.device), y.to(probs.device))
        return out

    def _transform(self, logits: Tensor, *, spacing: Spacing, image: Tensor | None) -> Tensor:
        p = class_probabilities(logits)
        return renormalise(self.one_vs_rest(p), p)

    def _state(self) -> dict[str, Any]:
        return {"x": [x.tolist() for x, _ in self.knots], "y": [y.tolist() for _, y in self.knots]}

    def _load_state(self, state: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        xs, ys = state.get("x"), state.get("y")
        if not isinstance(xs, list) or not isinstance(ys, list) or len(xs) != self.num_classes or len(ys) != len(xs):
            raise DataError(f"calibrator 'isotonic': parameters 'x' and 'y' must be {self.num_classes} lists each")
        self.knots = []
        for k, (xk, yk) in enumerate(zip(xs, ys)):
            try:
                x = torch.tensor(xk, dtype=torch.float64)
                y = torch.tensor(yk, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError):
                raise DataError(
                    f"calibrator 'isotonic': parameters 'x[{k}]' / 'y[{k}]' must be lists of numbers"
                ) from None
            valid = (
                x.dim() == 1 and x.shape == y.shape and x.numel() > 0
                and bool(torch.isfinite(x).all() and torch.isfinite(y).all())
                and bool((x[1:] > x[:-1]).all() and (y[1:] >= y[:-1]).all())
                and bool(((y >= 0) & (y <= 1)).all())
            )
            if not valid:
                raise DataError(
                    f"calibrator 'isotonic': parameters 'x[{k}]' / 'y[{k}]' must be equally long, finite, "
                    "x strictly increasing, y non-decreasing in [0, 1]"
                )
            self.knots.append((x, y))
