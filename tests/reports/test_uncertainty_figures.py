"""Uncertainty figures: one line per risk-coverage curve with its AURC in the legend, the scatter's
correlations equal numpy's, NaN cases left out and counted, PNGs that decode."""

from __future__ import annotations

import base64
import io
import re

import matplotlib.image
import numpy as np
import pytest

from segcalib.errors import DataError
from segcalib.reports.uncertainty_figures import (
    RiskCoverage,
    risk_coverage_figure,
    risk_coverage_uri,
    uncertainty_dice_figure,
    uncertainty_dice_uri,
)


def _decode(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    return matplotlib.image.imread(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])), format="png")


def _curves() -> list[RiskCoverage]:
    coverage = np.linspace(0.1, 1.0, 10)
    return [
        RiskCoverage("entropy", coverage[::-1], 0.2 * coverage[::-1] ** 2),  # unsorted on purpose
        RiskCoverage("mutual information", coverage, 0.2 * coverage, aurc=0.0123),
        RiskCoverage("random", [0.0, 1.0], [0.2, 0.2]),
    ]


def test_risk_coverage_has_one_line_per_curve_with_its_aurc() -> None:
    fig = risk_coverage_figure(_curves(), title="foreground voxels")
    (ax,) = fig.axes
    assert len(ax.lines) == 3
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    coverage = np.linspace(0.1, 1.0, 10)
    # trapezoid rule by hand: the mean of the end points of each interval times its width
    entropy_area = sum((b - a) * 0.2 * (a * a + b * b) / 2 for a, b in zip(coverage[:-1], coverage[1:]))
    assert labels == [f"entropy (AURC {entropy_area:.3g})", "mutual information (AURC 0.0123)", "random (AURC 0.2)"]
    xs, ys = ax.lines[0].get_data()
    assert np.all(np.diff(xs) > 0) and ys[-1] == pytest.approx(0.2)
    assert ax.get_xlabel().startswith("coverage") and ax.get_title() == "foreground voxels"
    image = _decode(risk_coverage_uri(_curves()))
    assert image.shape[:2] == (round(3.8 * 90), round(4.4 * 90))


def test_scatter_reports_pearson_and_spearman_and_names_the_worst_cases() -> None:
    rng = np.random.default_rng(1)
    uncertainty = rng.random(30)
    dice = np.clip(0.95 - 0.5 * uncertainty + 0.1 * rng.standard_normal(30), 0, 1)
    dice[4] = np.nan
    uncertainty[7] = np.inf
    ids = [f"case_{i:02d}" for i in range(30)]
    fig = uncertainty_dice_figure(uncertainty, dice, ids, "mean entropy (nats)", n_named=3)
    (ax,) = fig.axes
    keep = np.isfinite(uncertainty) & np.isfinite(dice)
    x, y = uncertainty[keep], dice[keep]
    pearson = np.corrcoef(x, y)[0, 1]
    ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731  (no ties among random floats)
    spearman = np.corrcoef(ranks(x), ranks(y))[0, 1]
    assert ax.get_title() == f"Pearson r = {pearson:.2f}, Spearman ρ = {spearman:.2f} (n = 28, 2 left out)"
    assert pearson < -0.5
    (points,) = ax.collections
    assert len(points.get_offsets()) == 28
    named = sorted(t.get_text() for t in ax.texts)
    assert named == sorted(np.asarray(ids)[keep][np.argsort(y)[:3]].tolist())
    image = _decode(uncertainty_dice_uri(uncertainty, dice, ids))
    assert image.shape[:2] == (round(3.8 * 90), round(4.4 * 90))


def test_too_few_or_constant_points_give_nan_correlations() -> None:
    fig = uncertainty_dice_figure([0.1, 0.2], [0.5, 0.7])
    assert re.match(r"Pearson r = nan, Spearman ρ = nan \(n = 2\)", fig.axes[0].get_title())
    fig = uncertainty_dice_figure([0.1, 0.2, 0.3], [0.5, 0.5, 0.5])
    assert "Pearson r = nan" in fig.axes[0].get_title()


def test_mismatched_inputs_are_refused() -> None:
    with pytest.raises(DataError, match="uncertainties for"):
        uncertainty_dice_figure([0.1, 0.2], [0.5])
    with pytest.raises(DataError, match="case ids"):
        uncertainty_dice_figure([0.1, 0.2], [0.5, 0.6], ["a"])
    with pytest.raises(DataError, match="'bad'"):
        risk_coverage_figure([RiskCoverage("bad", [0.1, 0.5], [0.2])])
