"""Streamed scores of calibrated probabilities on held-out cases (for choosing a calibrator).

Per region (``all``, ``foreground``, ``boundary`` of the ground truth, SPEC §3): the summed NLL
``-log max(p_y, 1e-12)`` and the top-label reliability bins (count, sum of confidence, sum of
correct), both gathered by the metrics' one-pass histogram (:func:`segcalib.metrics.binning.batch_histograms`,
SPEC binning, M = 15) and turned into ECE by the metrics' :func:`ece_from_bins`; plus, over every
valid voxel, how many changed their argmax against the uncalibrated prediction, and per class the
Dice counts (intersection, predicted, true) before and after calibration. Everything is a float64
sum, so the scores of a fold are exact whatever the order of the cases.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from segcalib.metrics.binning import HistogramRequest, batch_histograms
from segcalib.metrics.calibration_functional import ece_from_bins
from segcalib.spatial.regions import default_regions

REGIONS = default_regions()
NLL_EPS = 1e-12
_REQUEST = HistogramRequest(top=True, classwise=False, scores=True, nll_eps=NLL_EPS)


class HeldOutScores:
    """Sufficient statistics of one method on one fold's held-out cases (float64, CPU)."""

    def __init__(self, num_classes: int, n_bins: int = 15) -> None:
        self.num_classes = num_classes
        self.n_bins = n_bins
        self.bins = torch.zeros(len(REGIONS), n_bins, 3, dtype=torch.float64)
        self.nll = torch.zeros(len(REGIONS), 2, dtype=torch.float64)  # sum, count
        self.flips = torch.zeros(2, dtype=torch.float64)  # changed, total
        self.dice = torch.zeros(2, num_classes, 3, dtype=torch.float64)  # before/after: tp, pred, true

    def update(self, probs: Tensor, target: Tensor, regions: dict[str, Tensor], valid: Tensor, before: Tensor) -> None:
        """Add one case.

        Args:
            probs: calibrated probabilities ``(B, C, *S)``.
            target: labels ``(B, *S)``.
            regions: boolean ``(B, *S)`` mask per name in :data:`REGIONS` (already within ``valid``).
            valid: boolean ``(B, *S)``, voxels with a label in ``0..C-1``.
            before: the uncalibrated argmax ``(B, *S)``.
        """
        device = probs.device
        batch, num_classes = probs.shape[:2]
        y = target.to(device).clamp(0, self.num_classes - 1)
        # one cell per combination of region memberships; voxels outside every region are dropped
        n_cells = 2 ** len(REGIONS)
        cells = torch.full(y.shape, n_cells, dtype=torch.uint8, device=device)
        inside = torch.zeros(y.shape, dtype=torch.bool, device=device)
        code = torch.zeros(y.shape, dtype=torch.uint8, device=device)
        for bit, name in enumerate(REGIONS):
            m = regions[name].to(device)
            code |= m.to(torch.uint8) << bit
            inside |= m
        cells[inside] = code[inside]
        hist = batch_histograms(
            probs.detach().reshape(batch, num_classes, -1), y.reshape(batch, -1), self.n_bins,
            cells.reshape(batch, -1), n_cells, _REQUEST,
        )
        cell_ids = torch.arange(n_cells)
        membership = torch.stack([((cell_ids >> bit) & 1).double() for bit in range(len(REGIONS))])  # (R, cells)
        top = hist.top.sum(0).cpu()  # (cells, M, 3)
        self.bins += torch.einsum("rz,zms->rms", membership, top)
        self.nll[:, 0] += membership @ hist.scores[..., 0].sum(0).cpu()
        self.nll[:, 1] += membership @ top[..., 0].sum(-1)
        pred = probs.argmax(dim=1)
        v = valid.to(device)
        before = before.to(device)
        self.flips[0] += float((pred != before)[v].sum())
        self.flips[1] += float(v.sum())
        for i, labels in enumerate((before, pred)):
            self.dice[i] += _dice_counts(labels[v], y[v], self.num_classes)

    def compute(self) -> dict[str, float]:
        """``nll`` (all voxels), ``ece_<region>``, ``flip_rate`` and ``dice_change`` (NaN where undefined).

        ``dice_change`` is the mean over foreground classes (1..C-1) of the pooled Dice after minus
        before calibration; a class absent from both prediction and ground truth (before or after) is skipped.
        """
        out = {"nll": _ratio(self.nll[0, 0], self.nll[0, 1])}
        ece = ece_from_bins(self.bins)  # (R,), NaN for an empty region
        for r, name in enumerate(REGIONS):
            out[f"ece_{name}"] = float(ece[r])
        out["flip_rate"] = _ratio(self.flips[0], self.flips[1])
        tp, size = self.dice[:, 1:, 0], self.dice[:, 1:, 1] + self.dice[:, 1:, 2]
        defined = (size > 0).all(dim=0)
        if bool(defined.any()):
            dice = 2 * tp[:, defined] / size[:, defined]
            out["dice_change"] = float((dice[1] - dice[0]).mean())
        else:
            out["dice_change"] = math.nan
        return out


def _ratio(num: Tensor, den: Tensor) -> float:
    return float(num) / float(den) if float(den) > 0 else math.nan


def _dice_counts(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """``(C, 3)`` float64 on the CPU: intersection, predicted and true voxel counts per class."""
    hit = torch.bincount(target[pred == target], minlength=num_classes)
    predicted = torch.bincount(pred, minlength=num_classes)
    true = torch.bincount(target, minlength=num_classes)
    return torch.stack([hit, predicted, true], dim=1).double().cpu()
