"""Adaptive (equal-mass) calibration error, ACE (Nixon et al., "Measuring Calibration in Deep
Learning", CVPR Workshops 2019).

The samples (voxels; top-label confidence with correctness, or ``p_k`` with ``[y == k]`` per class)
are sorted by score and cut into ``R`` bins holding equal numbers of samples, ``N / R`` each;
``ACE = (1/R) sum_r |acc_r - conf_r|`` per row, then the mean over classes in class-wise mode
(Nixon's ``1/(KR) sum_k sum_r``). Two details make the value a function of the multiset of samples
alone (independent of voxel order, batch split and process count):

- a bin boundary that falls inside a run of tied scores takes the tied samples fractionally,
  i.e. with their mean outcome (the expectation over random tie breaking); with ``N`` divisible
  by ``R`` and no ties this is the textbook ACE;
- ``N / R`` need not be an integer: boundaries sit at masses ``r N / R`` and split a sample
  fractionally in the same way.

Exact: from the sorted distinct scores (``exact=True``, memory O(N)). Bounded (streaming): from
a fine equal-width histogram of the score with ``n_cells`` cells ``(j/L, (j+1)/L]`` holding count,
sum of scores and sum of outcomes; a boundary inside a cell splits the cell proportionally. If a
boundary at mass ``x`` splits a cell of ``c`` samples into ``a`` and ``c - a``, the cumulative
score and outcome sums at ``x`` are off by at most ``a (c - a) / c`` times the cell width and
times 1, so ``|ACE_hist - ACE_exact| <= (2 / N) sum_boundaries a (c - a) / c * (1 + 1/L)`` per
row (mean over rows in class-wise mode). The bound is returned with the value; it is small unless
a single cell holds a large share of the samples at a boundary (saturated probabilities).
"""

from __future__ import annotations

from typing import Any

import torch

from segcalib.metrics.binning import bin_index
from segcalib.metrics.inputs import INCLUDE_BACKGROUND, case_samples, check_mode, check_probs_target, evaluated_classes
from segcalib.metrics.state import CaseSampleState
from segcalib.metrics.streaming import summed_copy

DEFAULT_CELLS = 2**14


def _arg_validation(n_bins: int, n_cells: int) -> None:
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    if not isinstance(n_cells, int) or n_cells < 1:
        raise ValueError(f"n_cells must be an integer >= 1, got {n_cells!r}")


def equal_mass_from_atoms(atoms: torch.Tensor, n_bins: int, cell_width: float = 0.0) -> dict[str, torch.Tensor]:
    """Equal-mass binning of score-ordered atoms (distinct scores, or histogram cells).

    Args:
        atoms: float64 ``(A, 3)``: count, sum of scores, sum of outcomes, in increasing score order
            (atoms with count 0 are allowed).
        n_bins: number of equal-mass bins ``R``.
        cell_width: spread of scores within one atom (0 for distinct values), for the bound.

    Returns:
        ``ace`` (0-dim, NaN without samples), ``conf`` and ``acc`` per bin ``(R,)``,
        ``bound`` (0-dim): the bound on the difference to the exact value (see the module).
    """
    atoms = atoms.double()
    count = atoms[:, 0]
    total = count.sum()
    cum = torch.cat([atoms.new_zeros(1, 3), atoms.cumsum(0)])  # (A + 1, 3)
    if float(total) <= 0:
        nan = atoms.new_tensor(float("nan"))
        return {"ace": nan, "conf": nan.repeat(n_bins), "acc": nan.repeat(n_bins), "bound": nan}
    r = torch.arange(1, n_bins, dtype=torch.float64, device=atoms.device)
    x = r * total / n_bins  # interior boundaries (masses)
    j = torch.searchsorted(cum[1:, 0].contiguous(), x, right=False).clamp_(max=atoms.shape[0] - 1)
    a = x - cum[j, 0]
    c = count[j]
    frac = torch.where(c > 0, a / c.clamp(min=1e-300), torch.zeros_like(a))
    at_boundary = cum[j] + frac.unsqueeze(1) * atoms[j]  # cumulative sums at x
    edges = torch.cat([atoms.new_zeros(1, 3), at_boundary, cum[-1:]])  # (R + 1, 3)
    per_bin = edges[1:] - edges[:-1]
    mass = total / n_bins
    conf, acc = per_bin[:, 1] / mass, per_bin[:, 2] / mass
    split = torch.where(c > 0, a * (c - a) / c.clamp(min=1e-300), torch.zeros_like(a))
    bound = 2.0 * split.sum() * (1.0 + cell_width) / total if cell_width > 0 else atoms.new_zeros(())
    return {"ace": (acc - conf).abs().mean(), "conf": conf, "acc": acc, "bound": bound}


def exact_atoms(scores: torch.Tensor, outcomes: torch.Tensor) -> torch.Tensor:
    """``(A, 3)`` atoms (count, sum of scores, sum of outcomes) of the distinct scores of 1-D samples."""
    values, inverse, counts = torch.unique(scores.double(), sorted=True, return_inverse=True, return_counts=True)
    atoms = torch.zeros(values.numel(), 3, dtype=torch.float64, device=scores.device)
    atoms[:, 0] = counts.double()
    atoms[:, 1] = values * counts.double()
    atoms[:, 2].index_add_(0, inverse, outcomes.double())
    return atoms


def histogram_atoms(scores: torch.Tensor, outcomes: torch.Tensor, n_cells: int) -> torch.Tensor:
    """``(K, n_cells, 3)`` fine-histogram atoms of ``(K, N)`` samples (cells ``(j/L, (j+1)/L]``)."""
    return torch.stack([weighted_bins(bin_index(s, n_cells), s, o, n_cells) for s, o in zip(scores, outcomes)])


def weighted_bins(cell: torch.Tensor, scores: torch.Tensor, outcomes: torch.Tensor, n_bins: int) -> torch.Tensor:
    """``(n_bins, 3)`` count, sum of scores, sum of outcomes per bin index ``cell`` (float64),
    with memory linear in the samples (no stacked per-sample copies)."""
    return torch.stack(
        [
            torch.bincount(cell, minlength=n_bins).double(),
            torch.bincount(cell, weights=scores.double(), minlength=n_bins),
            torch.bincount(cell, weights=outcomes.double(), minlength=n_bins),
        ],
        -1,
    )


def _reduce_rows(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    per_row = torch.stack([r["ace"] for r in rows])
    return {
        "ace": per_row.mean(),
        "ace_per_class": per_row,
        "bound": torch.stack([r["bound"] for r in rows]).mean(),
        "conf": torch.stack([r["conf"] for r in rows]),
        "acc": torch.stack([r["acc"] for r in rows]),
    }


def adaptive_calibration_error(
    probs: torch.Tensor,
    target: torch.Tensor,
    n_bins: int = 15,
    mode: str = "classwise",
    include_background: bool = INCLUDE_BACKGROUND,
    exact: bool = True,
    n_cells: int = DEFAULT_CELLS,
) -> dict[str, torch.Tensor]:
    """ACE of all voxels of a batch (pooled over cases).

    Args:
        probs: ``(B, C, *spatial)`` probabilities.
        target: ``(B, *spatial)`` or ``(B, 1, *spatial)`` integer labels.
        n_bins: equal-mass bins ``R``.
        mode: ``"classwise"`` (Nixon's ACE: mean over the evaluated classes) or ``"top"``
            (top-label confidence vs correctness).
        include_background: average over class 0 too (class-wise mode).
        exact: from the sorted distinct scores; else from the ``n_cells`` histogram.
        n_cells: cells of the bounded histogram.

    Returns:
        float64 tensors: ``ace`` (0-dim), ``ace_per_class`` (``(K,)``; ``(1,)`` in top mode),
        ``bound`` (0 when exact), per-bin ``conf`` and ``acc`` ``(K, R)``.
    """
    _arg_validation(n_bins, n_cells)
    probs, labels = check_probs_target(probs, target)
    check_mode(mode)
    classes = evaluated_classes(probs.shape[1], include_background)
    cases = case_samples(probs, labels, mode, classes)
    scores = torch.cat([s for s, _ in cases], 1)
    outcomes = torch.cat([o for _, o in cases], 1)
    if exact:
        rows = [equal_mass_from_atoms(exact_atoms(s, o), n_bins) for s, o in zip(scores, outcomes)]
    else:
        hist = histogram_atoms(scores, outcomes, n_cells)
        rows = [equal_mass_from_atoms(h, n_bins, 1.0 / n_cells) for h in hist]
    return _reduce_rows(rows)


class AdaptiveCalibrationError(CaseSampleState):
    """Streaming ACE from a bounded fine histogram per evaluated class (or one top-label row).

    State: float64 ``hist`` ``(K, n_cells, 3)`` (count, sum of scores, sum of outcomes); it merges
    by summation, so any split of the cases over batches and processes gives the same result.
    ``compute()`` returns the same dict as :func:`adaptive_calibration_error` with ``exact=False``.
    """

    def __init__(
        self,
        num_classes: int,
        n_bins: int = 15,
        mode: str = "classwise",
        include_background: bool = INCLUDE_BACKGROUND,
        n_cells: int = DEFAULT_CELLS,
    ) -> None:
        super().__init__()
        _arg_validation(n_bins, n_cells)
        self.num_classes = num_classes
        self.n_bins = n_bins
        self.mode = check_mode(mode)
        self.include_background = include_background
        self.n_cells = n_cells
        self.classes = evaluated_classes(num_classes, include_background)
        rows = 1 if mode == "top" else len(self.classes)
        self.add_state("hist", (rows, n_cells, 3))

    def _config(self) -> tuple[Any, ...]:
        return (self.num_classes, self.n_bins, self.mode, self.include_background, self.n_cells)

    def _case_statistics(self, scores: torch.Tensor, outcomes: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"hist": histogram_atoms(scores, outcomes, self.n_cells)}

    def compute(self) -> dict[str, torch.Tensor]:
        """ACE over everything added on every process (summed under torch.distributed)."""
        hist = summed_copy(self.hist)
        return _reduce_rows([equal_mass_from_atoms(h, self.n_bins, 1.0 / self.n_cells) for h in hist])
