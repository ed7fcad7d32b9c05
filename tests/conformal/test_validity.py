"""Validity over random calibration/test splits: synthetic cases of a known distribution, and
(where the study's maps are on this machine) the hippocampus maps of a CE+Dice run.

Per-case losses are computed once; each split re-averages rows. Bounds (3 Monte-Carlo standard
errors of slack): CRC's mean test risk is <= alpha and >= alpha - 1/(n+1) for the threshold
(fnr) risk; the margin risk moves in voxel shells (large jumps), so only its upper bound holds;
Learn-then-Test's family-wise error is <= delta.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from segcalib.conformal.grids import radius_grid, threshold_grid
from segcalib.conformal.statistics import margin_counts, threshold_counts
from segcalib.conformal.targets import probabilities, target_names, targets, truth_of
from segcalib.conformal.validity import crc_split_risk, ltt_split_error
from tests.conformal._synthetic import SPACING, synthetic_case

ALPHAS = (0.05, 0.1, 0.2)
SPLITS = 1000
REPO = Path(__file__).resolve().parents[2]
# a CE+Dice run of the short study exported with logits (runs/ is not committed: where it is absent, e.g. CI on a
# clean clone, the real-data test is skipped; SEGCALIB_STUDY_EXPORTS points to another copy)
STUDY = Path(os.environ.get("SEGCALIB_STUDY_EXPORTS", REPO / "runs" / "study" / "short" / "ce_dice" / "seed0" / "exports"))
MANIFEST = REPO / "data_manifests" / "hippocampus_full.json"


def _losses(cases, names, with_margin: bool) -> dict[str, dict[str, np.ndarray]]:
    """``{target: {"fnr", "fdr", "margin": (N, L)}}`` over the cases that contain the target."""
    t, radii = threshold_grid(), radius_grid()
    out = {name: {"fnr": [], "fdr": [], "margin": []} for name in names}
    for probs, label, spacing, class_names in cases:
        for target in targets(probs, class_names):
            truth = truth_of(label, target.index)
            if not truth.any():
                continue  # the absent-class convention: left out of this target's risk
            counts = threshold_counts(target.prob, truth, t)
            out[target.name]["fnr"].append(counts.fnr())
            out[target.name]["fdr"].append(counts.fdr())
            if with_margin:
                out[target.name]["margin"].append(margin_counts(target.pred, truth, spacing, radii).fnr())
    return {name: {risk: np.array(rows) for risk, rows in by.items() if rows} for name, by in out.items()}


@pytest.fixture(scope="module")
def synthetic_losses() -> dict[str, dict[str, np.ndarray]]:
    names = ["background", "class1", "class2"]
    cases = ((*synthetic_case(seed), SPACING, names) for seed in range(300))
    return _losses(cases, target_names(names), with_margin=True)


def _check_crc(losses: np.ndarray, n_cal: int, alpha: float, lower: bool) -> float:
    result = crc_split_risk(losses, n_cal, alpha, SPLITS, seed=int(alpha * 1000))
    slack = 3 * result.se
    assert result.mean <= alpha + slack, (alpha, result)
    if lower:
        assert result.mean >= alpha - 1 / (n_cal + 1) - slack, (alpha, result)
    return result.mean


@pytest.mark.parametrize("alpha", ALPHAS)
def test_crc_is_valid_and_tight_on_synthetic_cases(synthetic_losses, alpha: float) -> None:
    for name in ("class1", "class2", "foreground"):
        _check_crc(synthetic_losses[name]["fnr"], 40, alpha, lower=True)
        _check_crc(synthetic_losses[name]["margin"], 40, alpha, lower=False)
    assert len(synthetic_losses["class2"]["fnr"]) < 300  # class 2 is absent from some cases: they were left out


@pytest.mark.parametrize("alpha", (0.1, 0.2))
def test_ltt_family_wise_error_is_at_most_delta_on_synthetic_cases(synthetic_losses, alpha: float) -> None:
    delta = 0.1
    for name in ("class1", "foreground"):
        result = ltt_split_error(synthetic_losses[name]["fdr"], 40, alpha, delta, SPLITS, seed=1)
        assert result.mean <= delta + 3 * result.se, (name, result)


def test_a_dishonest_rule_fails_the_same_check(synthetic_losses) -> None:
    """The check can fail: CRC without its finite-sample correction, at n = 10, is not valid."""
    losses, alpha, n_cal = synthetic_losses["class1"]["fnr"], 0.1, 10
    orders = np.argsort(np.random.default_rng(0).random((SPLITS, len(losses))), axis=1)
    risks = []
    for order in orders:
        mean = losses[order[:n_cal]].mean(0)
        j = int(np.flatnonzero(mean <= alpha)[0])  # plug-in: the empirical risk alone
        risks.append(losses[order[n_cal:], j].mean())
    risks = np.array(risks)
    assert risks.mean() > alpha + 3 * risks.std(ddof=1) / np.sqrt(SPLITS)


@pytest.mark.skipif(not (STUDY / "test").is_dir() or not MANIFEST.is_file(), reason="the study's hippocampus maps are not here")
@pytest.mark.slow
def test_crc_and_ltt_are_valid_on_real_hippocampus_maps() -> None:
    from segcalib.data import load_manifest, read_volume
    from segcalib.predictions import open_predictions

    def cases():
        for split in ("validation", "test"):
            folder = open_predictions(STUDY / split)
            manifest = load_manifest(MANIFEST, split_seed=int(folder.metadata.get("split_seed", 12345)))
            for case in manifest.labelled(split):
                pred = folder.read(case.case_id)
                label = read_volume(case.label, dtype=np.int64)[0].reshape(pred.spatial_shape)
                yield probabilities(pred), label, pred.spacing, manifest.class_names

    names = load_manifest(MANIFEST).class_names
    losses = _losses(cases(), target_names(names), with_margin=False)
    n_pool = len(losses["foreground"]["fnr"])
    assert n_pool == 36
    n_cal = 27
    for name, by in losses.items():
        for alpha in ALPHAS:
            _check_crc(by["fnr"], n_cal, alpha, lower=True)
        result = ltt_split_error(by["fdr"], n_cal, 0.1, 0.1, SPLITS, seed=2)
        assert result.mean <= 0.1 + 3 * result.se, (name, result)
