"""The ``balanced`` criterion on hand-made CV tables (values computed by hand)."""

from __future__ import annotations

import math

import pytest

from segcalib.calibrators.criteria import choose, score


def _row(nll: float, ece_all: float, ece_fg: float, ece_bd: float) -> dict:
    values = {"nll": nll, "ece_all": ece_all, "ece_foreground": ece_fg, "ece_boundary": ece_bd}
    return {k: {"mean": v, "std": 0.0, "folds": [v]} for k, v in values.items()}


RAW = _row(0.0611, 0.0094, 0.1179, 0.0903)


def test_balanced_score_is_the_mean_of_the_four_ratios() -> None:
    value, admissible = score("balanced", _row(0.0358, 0.0019, 0.0372, 0.0192), RAW)
    expected = (0.0358 / 0.0611 + 0.0019 / 0.0094 + 0.0372 / 0.1179 + 0.0192 / 0.0903) / 4
    assert value == pytest.approx(expected, rel=1e-12) and admissible
    assert score("nll", _row(0.0358, 1, 1, 1), RAW) == (0.0358, True)


def test_a_region_made_worse_is_not_admissible_even_with_the_best_mean() -> None:
    table = {
        # best NLL and best mean, but the boundary ECE gets worse than uncalibrated: not admissible
        "sharp": _row(0.030, 0.0010, 0.020, 0.0950),
        "balanced_one": _row(0.040, 0.0030, 0.060, 0.0400),
        "broken": {"error": "failed"},
    }
    winner, scores = choose("balanced", table, RAW, ["sharp", "balanced_one", "broken"])
    assert winner == "balanced_one"
    assert scores["sharp"]["score"] < scores["balanced_one"]["score"] and not scores["sharp"]["admissible"]
    assert "broken" not in scores
    assert choose("nll", table, RAW, ["sharp", "balanced_one"])[0] == "sharp"


def test_no_admissible_candidate_falls_back_to_the_lowest_score() -> None:
    table = {"a": _row(0.07, 0.0095, 0.10, 0.08), "b": _row(0.05, 0.0100, 0.12, 0.10)}
    winner, scores = choose("balanced", table, RAW, ["a", "b"])
    assert winner == min(scores, key=lambda n: scores[n]["score"]) and not scores[winner]["admissible"]


def test_metrics_undefined_for_the_raw_maps_are_left_out() -> None:
    raw = _row(0.06, 0.01, math.nan, 0.09)
    value, admissible = score("balanced", _row(0.03, 0.005, 0.02, 0.045), raw)
    assert value == pytest.approx((0.5 + 0.5 + 0.5) / 3) and admissible
