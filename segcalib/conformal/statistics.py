"""Per-case sufficient statistics of the conformal risks, and their sum over cases.

For one case and one target (a foreground class, or the union of the foreground classes) and
every grid index ``j`` (see :mod:`segcalib.conformal.grids`; the mask grows with ``j``):

- ``covered[j]``: voxels in the mask ``S_j``;
- ``hits[j]``: true voxels in ``S_j``;
- ``n_truth``: true voxels of the case.

From these, per case (each a loss in [0, 1]):

- ``fnr_j = 1 - hits_j / n_truth`` (fraction of the structure outside the mask, 1 - recall);
- ``fdr_j = (covered_j - hits_j) / covered_j``, 0 for an empty mask (1 - precision);
- relative size ``covered_j / n_truth``.

A case whose truth is empty for the target (the class is absent) has no defined miss rate; it
is left out of that target's risks and counted (:attr:`RiskSums.absent`), never scored 0/0.
:class:`RiskSums` keeps only sums over cases (float64), so memory does not grow with them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from segcalib.spatial.distance import distance_transform

RISKS = ("fnr", "fdr", "margin")


@dataclass(frozen=True)
class CaseCounts:
    """One case's counts for one target on a grid: ``covered``, ``hits`` int64 ``(L,)``."""

    covered: np.ndarray
    hits: np.ndarray
    n_truth: int

    def fnr(self) -> np.ndarray:
        """1 - recall per grid index (float64); undefined (an error) for an absent class."""
        if self.n_truth == 0:
            raise ValueError("fnr of a case without the class is undefined")
        return 1.0 - self.hits / float(self.n_truth)

    def fdr(self) -> np.ndarray:
        """1 - precision per grid index (float64), 0 where the mask is empty."""
        false = (self.covered - self.hits).astype(np.float64)
        return np.divide(false, self.covered, out=np.zeros_like(false), where=self.covered > 0)

    def relative_size(self) -> np.ndarray:
        """Mask size over true size per grid index (float64)."""
        return self.covered / float(max(self.n_truth, 1))

    def loss(self, risk: str) -> np.ndarray:
        return self.fdr() if risk == "fdr" else self.fnr()


def _cumulative(first_index: np.ndarray, length: int) -> np.ndarray:
    """``out[j] = #{v : first_index[v] <= j}`` for ``j < length`` (int64)."""
    return np.cumsum(np.bincount(first_index, minlength=length + 1)[:length], dtype=np.int64)


def threshold_counts(prob: np.ndarray, truth: np.ndarray, thresholds: np.ndarray) -> CaseCounts:
    """Counts of the masks ``prob >= t_j`` for the descending ``thresholds``.

    Args:
        prob: float32 (or float64) probabilities of the target, ``(*spatial)``.
        truth: boolean ``(*spatial)``, the true voxels of the target.
        thresholds: float64, descending (:func:`segcalib.conformal.grids.threshold_grid`).
    """
    length = len(thresholds)
    ascending = thresholds[::-1]
    # number of thresholds <= p; voxel v is in S_j exactly when j >= length - that number
    first = length - np.searchsorted(ascending, prob.reshape(-1).astype(np.float64), side="right")
    truth = truth.reshape(-1)
    return CaseCounts(covered=_cumulative(first, length), hits=_cumulative(first[truth], length),
                      n_truth=int(truth.sum()))


def signed_distance(pred: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Signed Euclidean distance in mm (float64, ``(*spatial)``) to the predicted mask, centre to
    centre with the voxel spacing: outside ``pred`` the distance to its nearest voxel (>= the
    smallest spacing), inside minus the depth below the mask's outer layer, i.e.
    ``-(distance to the nearest voxel outside - smallest spacing)`` (<= 0, 0 on the layer that
    touches the outside along the finest axis). So ``{sd <= r}`` is ``pred`` for ``0 <= r <``
    the smallest spacing, ``pred`` dilated by ``r`` mm for ``r > 0`` and eroded by ``-r`` mm below
    its outer layer for ``r < 0``. ``inf`` everywhere when ``pred`` is empty, ``-inf`` when it is
    the whole image."""
    pred = torch.from_numpy(np.ascontiguousarray(pred, dtype=bool))
    if not bool(pred.any()):
        return np.full(tuple(pred.shape), np.inf)
    if bool(pred.all()):
        return np.full(tuple(pred.shape), -np.inf)
    inside = pred.numpy()
    signed = distance_transform(~pred, spacing).numpy()  # 0 inside the mask
    depth = distance_transform(pred, spacing).numpy()  # 0 outside it
    depth -= min(spacing)
    np.maximum(depth, 0.0, out=depth)
    np.subtract(signed, depth, out=signed, where=inside)  # in place: few full-size temporaries
    return signed


def margin_counts(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...], radii: np.ndarray) -> CaseCounts:
    """Counts of the masks ``signed_distance(pred) <= r_j`` for the ascending ``radii`` (the
    last one ``inf``: the whole image)."""
    distance = signed_distance(pred, spacing).reshape(-1)
    finite = radii[:-1]
    first = np.searchsorted(finite, distance, side="left")  # d <= r_j exactly when j >= first
    length = len(radii)
    truth = truth.reshape(-1)
    covered = _cumulative(first, length)
    hits = _cumulative(first[truth], length)
    covered[-1], hits[-1] = distance.size, int(truth.sum())  # r = inf: the whole image
    return CaseCounts(covered=covered, hits=hits, n_truth=int(truth.sum()))


@dataclass
class RiskSums:
    """Sums over cases of one target's losses for one risk (float64 ``(L,)``), and the counts.

    ``n`` cases scored; ``absent`` the case ids left out because the target was absent.
    """

    risk: str
    length: int
    loss: np.ndarray = field(default=None)  # type: ignore[assignment]
    size: np.ndarray = field(default=None)  # type: ignore[assignment]
    n: int = 0
    absent: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.loss is None:
            self.loss = np.zeros(self.length, dtype=np.float64)
        if self.size is None:
            self.size = np.zeros(self.length, dtype=np.float64)

    def add(self, case_id: str, counts: CaseCounts) -> None:
        if counts.n_truth == 0:
            self.absent.append(case_id)
            return
        self.loss += counts.loss(self.risk)
        self.size += counts.relative_size()
        self.n += 1

    def merge(self, other: RiskSums) -> None:
        self.loss += other.loss
        self.size += other.size
        self.n += other.n
        self.absent.extend(other.absent)

    def mean_loss(self) -> np.ndarray:
        return self.loss / max(self.n, 1)

    def mean_size(self) -> np.ndarray:
        return self.size / max(self.n, 1)
