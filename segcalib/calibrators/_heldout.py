"""Streamed scores of calibrated probabilities on held-out cases (for choosing a calibrator).

Per region (``all``, ``foreground``, ``boundary`` of the ground truth, SPEC §3): the summed NLL
``-log max(p_y, 1e-12)`` and the top-label reliability bins (count, sum of confidence, sum of
correct) with SPEC binning ``b = clamp(ceil(p M) - 1, 0, M - 1)``, M = 15; plus, over every valid
voxel, how many changed their argmax against the uncalibrated prediction, and per class the Dice
counts (intersection, predicted, true) before and after calibration. Everything is a float64 sum,
so the scores of a fold are exact whatever the order of the cases. This is a small re-implementation
of the ECE of :mod:`segcalib.metrics` (calibrators may not import metrics).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from segcalib.calibrators._class_histograms import bin_index
from segcalib.spatial.regions import default_regions

REGIONS = default_regions()
NLL_EPS = 1e-12


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
        p = probs.detach().double().movedim(1, -1)  # (B, *S, C)
        conf, pred = p.max(dim=-1)
        y = target.to(p.device).clamp(0, self.num_classes - 1)
        p_true = p.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        nll = -p_true.clamp_min(NLL_EPS).log()
        correct = (pred == y).double()
        bins = bin_index(conf, self.n_bins)
        for r, name in enumerate(REGIONS):
            m = regions[name].to(p.device)
            b = bins[m]
            self.nll[r, 0] += float(nll[m].sum())
            self.nll[r, 1] += float(m.sum())
            self.bins[r, :, 0] += torch.bincount(b, minlength=self.n_bins).double().cpu()
            self.bins[r, :, 1] += torch.bincount(b, weights=conf[m], minlength=self.n_bins).cpu()
            self.bins[r, :, 2] += torch.bincount(b, weights=correct[m], minlength=self.n_bins).cpu()
        v = valid.to(p.device)
        before = before.to(p.device)
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
        for r, name in enumerate(REGIONS):
            n = float(self.bins[r, :, 0].sum())
            gap = (self.bins[r, :, 2] - self.bins[r, :, 1]).abs().sum()
            out[f"ece_{name}"] = float(gap) / n if n > 0 else math.nan
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
