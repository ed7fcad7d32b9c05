"""How ``auto`` ranks the cross-validated calibrators: one held-out metric, or the region-balanced score.

``balanced`` (the default, the study's criterion): the mean over NLL and the ECE of all voxels, the
foreground and the boundary band of ``candidate / uncalibrated`` (each on the same held-out folds). A
candidate that makes any of the four worse than the uncalibrated maps (ratio > 1) is not admissible:
a gain in one region cannot pay for a loss in another. When no candidate is admissible the lowest
score is still chosen, and the selection says so. A metric that is undefined or zero for the
uncalibrated maps (e.g. no foreground) is left out of the mean.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

REGION_METRICS = ("nll", "ece_all", "ece_foreground", "ece_boundary")
PRESERVE = ("none", "argmax", "order")  # which candidates auto keeps: all, argmax-preserving, order-preserving
CV_FIT_VOXELS = 200_000  # voxels each fold's calibrator is fitted on (the final refit uses max_voxels)
BALANCED = "balanced"
CRITERIA = (BALANCED, *REGION_METRICS)


def balanced_ratios(row: Mapping[str, Any], uncalibrated: Mapping[str, Any]) -> dict[str, float]:
    """``candidate / uncalibrated`` of each metric of :data:`REGION_METRICS` where both are defined."""
    out = {}
    for metric in REGION_METRICS:
        mine, base = row[metric]["mean"], uncalibrated[metric]["mean"]
        if math.isfinite(mine) and math.isfinite(base) and base > 0:
            out[metric] = mine / base
    return out


def score(criterion: str, row: Mapping[str, Any], uncalibrated: Mapping[str, Any]) -> tuple[float, bool]:
    """``(score, admissible)`` of one table row; lower scores are better, NaN when undefined."""
    if criterion != BALANCED:
        return row[criterion]["mean"], True
    ratios = balanced_ratios(row, uncalibrated)
    if not ratios:
        return math.nan, False
    return sum(ratios.values()) / len(ratios), all(r <= 1.0 for r in ratios.values())


def choose(
    criterion: str, table: Mapping[str, Mapping[str, Any]], uncalibrated: Mapping[str, Any], order: list[str]
) -> tuple[str | None, dict[str, dict[str, Any]]]:
    """The winner (the lowest admissible score; the lowest score if none is admissible) and, per
    candidate that was scored, ``{"score", "admissible"}``. ``order`` breaks ties (first wins)."""
    scored: dict[str, dict[str, Any]] = {}
    for name in order:
        row = table.get(name, {})
        if "error" in row or not row:
            continue
        value, admissible = score(criterion, row, uncalibrated)
        if math.isfinite(value):
            scored[name] = {"score": value, "admissible": admissible}
    if not scored:
        return None, scored
    pool = [n for n in order if n in scored and scored[n]["admissible"]] or [n for n in order if n in scored]
    return min(pool, key=lambda n: scored[n]["score"]), scored
