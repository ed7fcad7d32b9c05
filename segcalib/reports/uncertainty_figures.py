"""Figures that show whether uncertainty can be trusted: risk-coverage curves and uncertainty vs Dice.

A risk-coverage curve keeps the fraction ``coverage`` of the most confident voxels (or cases) and
plots the error rate among them; a useful uncertainty makes the curve fall as coverage shrinks, and
a smaller area under it (AURC) is better. The scatter puts one point per case: a per-case
uncertainty that can flag failures falls as Dice rises (a negative correlation).

Both come as figures (for tests and further styling) and as PNG ``data:`` URIs for the HTML report.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from scipy import stats  # noqa: E402

from segcalib.errors import DataError  # noqa: E402
from segcalib.reports.figures import COLOURS, data_uri  # noqa: E402

_DPI = 90


@dataclass
class RiskCoverage:
    """One risk-coverage curve: ``coverage`` in [0, 1], the ``risk`` at each coverage, its AURC.

    ``aurc`` is the value the caller computed (shown in the legend as given); when it is None the
    area under the plotted points (trapezoid rule over coverage) is shown instead.
    """

    label: str
    coverage: Sequence[float]
    risk: Sequence[float]
    aurc: float | None = None


def risk_coverage_figure(
    curves: Sequence[RiskCoverage], title: str = "Risk–coverage", risk_name: str = "risk (error rate)"
) -> Figure:
    """Risk (y) against coverage (x), one line per curve, AURC in the legend."""
    fig = _figure((4.4, 3.8))
    ax = fig.add_subplot()
    for i, curve in enumerate(curves):
        coverage = np.asarray(curve.coverage, dtype=np.float64)
        risk = np.asarray(curve.risk, dtype=np.float64)
        if coverage.shape != risk.shape or coverage.ndim != 1:
            raise DataError(f"risk-coverage curve {curve.label!r}: coverage {coverage.shape} and risk {risk.shape} differ")
        order = np.argsort(coverage, kind="stable")
        coverage, risk = coverage[order], risk[order]
        aurc = curve.aurc if curve.aurc is not None else area_under(coverage, risk)
        ax.plot(coverage, risk, color=COLOURS[i % len(COLOURS)], linewidth=1.5, label=f"{curve.label} (AURC {aurc:.3g})")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("coverage (fraction kept, most confident first)")
    ax.set_ylabel(risk_name)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def risk_coverage_uri(curves: Sequence[RiskCoverage], title: str = "Risk–coverage", risk_name: str = "risk (error rate)") -> str:
    """:func:`risk_coverage_figure` as a PNG ``data:`` URI."""
    return data_uri(figure_png(risk_coverage_figure(curves, title, risk_name)))


def uncertainty_dice_figure(
    uncertainty: Sequence[float],
    dice: Sequence[float],
    case_ids: Sequence[str] | None = None,
    uncertainty_name: str = "mean uncertainty",
    n_named: int = 5,
) -> Figure:
    """One point per case, uncertainty (x) against Dice (y); Pearson r and Spearman ρ in the title.

    Cases where either value is NaN or infinite are left out and counted in the title; the
    ``n_named`` lowest-Dice cases are labelled with their ids so that they can be found below.
    """
    x = np.asarray(uncertainty, dtype=np.float64)
    y = np.asarray(dice, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise DataError(f"uncertainty-vs-Dice: {x.shape} uncertainties for {y.shape} Dice values")
    if case_ids is not None and len(case_ids) != len(x):
        raise DataError(f"uncertainty-vs-Dice: {len(case_ids)} case ids for {len(x)} cases")
    keep = np.isfinite(x) & np.isfinite(y)
    pearson, spearman = correlations(x[keep], y[keep])
    fig = _figure((4.4, 3.8))
    ax = fig.add_subplot()
    ax.scatter(x[keep], y[keep], s=14, color=COLOURS[0], alpha=0.75, edgecolors="none")
    if case_ids is not None and n_named > 0:
        kept = np.flatnonzero(keep)
        named = kept[np.argsort(y[kept], kind="stable")[:n_named]]
        # One row per name in the lower part of the axes (Dice rarely goes there), in the points'
        # left-to-right order, each led back to its point by a thin line: names never overlap,
        # however close their points are.
        x0, x1 = ax.get_xlim()
        for row, i in enumerate(sorted(named, key=lambda i: (x[i], y[i]))):
            column = (x[i] - x0) / (x1 - x0)  # the name starts (left half) or ends (right half) below its point
            ax.annotate(
                str(case_ids[i]), (x[i], y[i]), xytext=(min(max(column, 0.02), 0.98), 0.04 + 0.075 * row),
                textcoords="axes fraction", ha="left" if column < 0.5 else "right", fontsize=6,
                arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.5},
            )
    left_out = int((~keep).sum())
    title = f"Pearson r = {_fmt(pearson)}, Spearman ρ = {_fmt(spearman)} (n = {int(keep.sum())}"
    ax.set_title(title + (f", {left_out} left out)" if left_out else ")"), fontsize=9)
    ax.set_xlabel(uncertainty_name)
    ax.set_ylabel("Dice")
    ax.set_ylim(min(0.0, float(np.min(y[keep]))) if keep.any() else 0.0, 1.02)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def uncertainty_dice_uri(
    uncertainty: Sequence[float],
    dice: Sequence[float],
    case_ids: Sequence[str] | None = None,
    uncertainty_name: str = "mean uncertainty",
    n_named: int = 5,
) -> str:
    """:func:`uncertainty_dice_figure` as a PNG ``data:`` URI."""
    return data_uri(figure_png(uncertainty_dice_figure(uncertainty, dice, case_ids, uncertainty_name, n_named)))


def correlations(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Pearson and Spearman correlation of two 1D arrays; NaN when fewer than 3 points or constant."""
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    return float(stats.pearsonr(x, y).statistic), float(stats.spearmanr(x, y).statistic)


def area_under(coverage: np.ndarray, risk: np.ndarray) -> float:
    """Area under risk over coverage (trapezoid rule on the given points, sorted by coverage)."""
    if len(coverage) < 2:
        return math.nan
    return float(np.sum(np.diff(coverage) * (risk[1:] + risk[:-1]) / 2.0))


def figure_png(fig: Figure) -> bytes:
    """A figure of this module as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def _figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.2f}"
