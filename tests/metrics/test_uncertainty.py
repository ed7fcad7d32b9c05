"""Uncertainty-quality metrics: a 10-voxel case worked by hand, exact tie bounds, parity with
sklearn's roc_auc_score and with float64 numpy references (the QU-BraTS one written after the
challenge's evaluation code), merging in any order, regions and the case-level correlation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import segcalib.metrics.uncertainty as uncertainty_module
from segcalib.metrics.uncertainty import (
    UncertaintyMetric,
    foreground_union,
    max_uncertainty,
    uncertainty_dice_correlation,
)

# ---------------------------------------------------------------- independent float64 references


def aurc_reference(u: np.ndarray, err: np.ndarray, errors_first: bool) -> float:
    """Mean over k of the error rate of the k most certain voxels; ties ordered errors first/last."""
    flag = err.astype(np.int64)
    order = np.lexsort((-flag if errors_first else flag, u))  # sort by u, then by the error flag
    e = flag[order].astype(np.float64)
    return float(np.mean([e[: k + 1].sum() / (k + 1) for k in range(len(e))]))


def ueo_reference(u: np.ndarray, err: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    out = []
    for t in thresholds:
        mask = u >= t
        denom = mask.sum() + err.sum()
        out.append(2 * (mask & err).sum() / denom if denom else np.nan)
    return np.asarray(out)


def qu_brats_reference(gt: np.ndarray, pred: np.ndarray, unc100: np.ndarray, brain: np.ndarray, k: int) -> float:
    """The challenge's per-class score, loop by loop as in its evaluation script (binary task k)."""
    g, p = (gt == k).astype(np.float64), (pred == k).astype(np.float64)
    thresholds = [100.0, 75.0, 50.0, 25.0, 0.0]
    dice, ftp, ftn = [], [], []
    tp_all = (p * g * brain).sum()
    tn_all = ((1 - p) * (1 - g) * brain).sum()
    for th in thresholds:
        keep = np.where(unc100 > th, 0.0, 1.0) * brain
        inter, union = (p * keep * g * keep).sum(), (p * keep).sum() + (g * keep).sum()
        dice.append(1.0 if union == 0 else 2 * inter / union)
        ftp.append((tp_all - (p * g * keep).sum()) / tp_all if tp_all else 0.0)
        ftn.append((tn_all - ((1 - p) * (1 - g) * keep).sum()) / tn_all if tn_all else 0.0)
    x = np.asarray(thresholds) / 100
    auc = lambda y: float(np.sum((x[:-1] - x[1:]) * (np.asarray(y[:-1]) + np.asarray(y[1:])) / 2))  # noqa: E731
    return (auc(dice) + (1 - auc(ftp)) + (1 - auc(ftn))) / 3


# ---------------------------------------------------------------- the 10-voxel case


# Ten voxels in order of uncertainty u = 0.05, 0.15, ..., 0.95 (range [0, 1]), two classes:
#   gt   = 1 1 0 0 1 0 1 1 0 1
#   pred = 1 1 1 0 1 0 0 1 1 0      -> errors at ranks 3, 7, 9, 10
# Risk of the k most certain: 0, 0, 1/3, 1/4, 1/5, 1/6, 2/7, 2/8, 3/9, 4/10; their mean
#   AURC = (2/3 + 1/2 + 3/5 + 1/6 + 2/7) / 10 = 466/2100 = 233/1050.
# Perfect ranking (errors last): (1/7 + 2/8 + 3/9 + 4/10) / 10 = 473/4200.
# AUROC: errors at ranks 3, 7, 9, 10 sit above 2, 5, 6, 6 of the 6 correct voxels -> 19/24.
# UEO at t = 0.5 (u > 0.5: ranks 6-10, 3 of them errors): 2*3 / (5 + 4) = 2/3; best over
#   thresholds: the top 4 (ranks 7-10, 3 errors), 2*3 / (4 + 4) = 3/4, first reached just above 0.55.
# QU-BraTS, class 1 (TP = ranks 1 2 5 8, TN = 4 6), uncertainty x100 = 5, 15, ..., 95
#   (rank 3 is exactly 25 and rank 8 exactly 75: "> τ" keeps them at τ = 25 and 75):
#   τ    100   75    50    25    0
#   Dice 8/12  8/10  6/7   4/5   1 (nothing left)
#   FTP  0     0     1/4   2/4   1
#   FTN  0     0     1/2   1     1
#   AUC_Dice = (5/6 + 8/5 + 6/7) / 4 = 691/840, AUC_FTP = 5/16, AUC_FTN = 1/2,
#   score = (691/840 + 11/16 + 1/2) / 3.
U10 = torch.tensor([0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95]).view(1, 10)
GT10 = torch.tensor([1, 1, 0, 0, 1, 0, 1, 1, 0, 1]).view(1, 10)
PRED10 = torch.tensor([1, 1, 1, 0, 1, 0, 0, 1, 1, 0]).view(1, 10)


def test_ten_voxels_worked_by_hand() -> None:
    metric = UncertaintyMetric(2, (0.0, 1.0), include_background=False)
    metric.update(U10, PRED10, GT10)
    out = metric.compute()
    assert out["voxels"] == 10 and out["errors"] == 4 and out["error_rate"] == 0.4
    assert out["aurc"] == pytest.approx(233 / 1050, abs=1e-14)
    assert out["aurc_bound"] == 0.0  # every voxel in its own bin: exact
    assert out["aurc_optimal"] == pytest.approx(473 / 4200, abs=1e-14)
    assert out["e_aurc"] == pytest.approx(233 / 1050 - 473 / 4200, abs=1e-14)
    assert out["auroc"] == pytest.approx(19 / 24, abs=1e-15)
    assert out["ueo"] == pytest.approx(2 / 3, abs=1e-15)
    assert out["ueo_best"] == pytest.approx(3 / 4, abs=1e-15)
    assert 0.55 < out["ueo_best_threshold"] <= 0.65
    assert out["mean_uncertainty"] == pytest.approx(0.5, abs=1e-7)
    qu = out["qu_brats"]
    c1 = qu["classes"]["1"]
    assert qu["thresholds"] == [100.0, 75.0, 50.0, 25.0, 0.0]
    assert c1["dice"] == pytest.approx([8 / 12, 8 / 10, 6 / 7, 4 / 5, 1.0], abs=1e-15)
    assert c1["ftp"] == pytest.approx([0, 0, 0.25, 0.5, 1.0], abs=1e-15)
    assert c1["ftn"] == pytest.approx([0, 0, 0.5, 1.0, 1.0], abs=1e-15)
    assert (c1["auc_dice"], c1["auc_ftp"], c1["auc_ftn"]) == pytest.approx((691 / 840, 5 / 16, 1 / 2), abs=1e-15)
    assert c1["score"] == pytest.approx((691 / 840 + 11 / 16 + 1 / 2) / 3, abs=1e-15)
    assert qu["score"] == c1["score"]  # background left out of the mean by default
    u100, gt, pred = U10.double().numpy()[0] * 100, GT10.numpy()[0], PRED10.numpy()[0]
    for k in (0, 1):
        expected = qu_brats_reference(gt, pred, u100, np.ones(10), k)
        assert qu["classes"][str(k)]["score"] == pytest.approx(expected, abs=1e-14)
    curve = metric.risk_coverage()
    np.testing.assert_allclose(curve["risk"].numpy(), [0, 0, 1 / 3, 1 / 4, 1 / 5, 1 / 6, 2 / 7, 2 / 8, 3 / 9, 4 / 10])
    np.testing.assert_allclose(curve["coverage"].numpy(), np.arange(1, 11) / 10)


def test_ties_within_a_bin_give_exact_bounds() -> None:
    # four voxels in one bin, two errors. Errors first: risks 1, 1, 2/3, 2/4 -> AURC 19/24;
    # errors last: 0, 0, 1/3, 2/4 -> 5/24. Midpoint 1/2, half-gap 7/24.
    metric = UncertaintyMetric(3, (0.0, 1.0), include_background=False, n_bins=1)
    metric.update(torch.tensor([[0.1, 0.2, 0.3, 0.4]]), torch.tensor([[0, 1, 2, 2]]), torch.tensor([[0, 2, 2, 0]]))
    out = metric.compute()
    assert (out["aurc_min"], out["aurc_max"]) == pytest.approx((5 / 24, 19 / 24), abs=1e-15)
    assert (out["aurc"], out["aurc_bound"]) == pytest.approx((0.5, 7 / 24), abs=1e-15)
    assert out["auroc"] == 0.5  # every error tied with every correct voxel


def _quantised_case(seed: int, n: int = 3000, levels: int = 97, classes: int = 3):
    """Uncertainties on a grid of bin centres (equal values share a bin, distinct values don't)."""
    g = torch.Generator().manual_seed(seed)
    u = (torch.randint(0, levels, (2, n // 2), generator=g).double() + 0.5) / levels
    target = torch.randint(0, classes, (2, n // 2), generator=g)
    wrong = torch.rand(2, n // 2, generator=g) < 0.15 + 0.6 * u  # errors where uncertain, mostly
    pred = torch.where(wrong, (target + 1) % classes, target)
    return u.float(), pred, target


@pytest.mark.parametrize("seed", [0, 1])
def test_auroc_and_aurc_bounds_match_references(seed: int) -> None:
    u, pred, target = _quantised_case(seed)
    metric = UncertaintyMetric(3, (0.0, 1.0), include_background=False, n_bins=97)
    metric.update(u, pred, target)
    out = metric.compute()
    un, err = u.double().numpy().ravel(), (pred != target).numpy().ravel()
    assert out["auroc"] == pytest.approx(roc_auc_score(err, un), abs=1e-12)
    assert out["aurc_min"] == pytest.approx(aurc_reference(un, err, errors_first=False), abs=1e-12)
    assert out["aurc_max"] == pytest.approx(aurc_reference(un, err, errors_first=True), abs=1e-12)
    assert 0 < out["aurc_bound"] < 0.01
    edges = np.arange(98) / 97
    reference = ueo_reference(un, err, edges)
    assert out["ueo_best"] == pytest.approx(np.nanmax(reference), abs=1e-14)
    assert out["ueo_best_threshold"] == pytest.approx(edges[np.nanargmax(reference)], abs=1e-14)
    # distinct values in distinct fine bins: the bound vanishes and AURC is the exact value
    fine = UncertaintyMetric(3, (0.0, 1.0), include_background=False, n_bins=2**16)
    distinct = torch.randperm(u.numel(), generator=torch.Generator().manual_seed(seed)).double().view_as(u) / u.numel()
    fine.update(distinct, pred, target)
    exact = fine.compute()
    dn = distinct.numpy().ravel()
    assert exact["aurc_bound"] == 0.0
    assert exact["aurc"] == pytest.approx(aurc_reference(dn, err, errors_first=True), abs=1e-12)
    assert exact["auroc"] == pytest.approx(roc_auc_score(err, dn), abs=1e-12)


def test_qu_brats_matches_the_challenge_code_with_a_region_mask() -> None:
    u, pred, target = _quantised_case(3, n=4000, levels=400, classes=4)
    u = u * math.log(4)  # an entropy-like range
    g = torch.Generator().manual_seed(9)
    brain = torch.rand(u.shape, generator=g) < 0.7
    metric = UncertaintyMetric(4, (0.0, max_uncertainty("entropy", 4)), include_background=False)
    metric.update(u, pred, target, mask=brain)
    qu = metric.compute()["qu_brats"]
    u100 = np.clip(u.double().numpy().ravel() / math.log(4) * 100, 0, 100)
    scores = []
    for k in range(4):
        args = (target.numpy().ravel(), pred.numpy().ravel(), u100, brain.numpy().ravel().astype(np.float64), k)
        expected = qu_brats_reference(*args)
        assert qu["classes"][str(k)]["score"] == pytest.approx(expected, abs=1e-12)
        scores.append(expected)
    assert qu["score"] == pytest.approx(np.mean(scores[1:]), abs=1e-12)


def test_a_region_mask_equals_evaluating_its_voxels_alone() -> None:
    u, pred, target = _quantised_case(4)
    mask = foreground_union(pred, target)
    assert torch.equal(mask, (pred > 0) | (target > 0))
    masked = UncertaintyMetric(3, (0.0, 1.0), include_background=False)
    masked.update(u, pred, target, mask=mask)
    alone = UncertaintyMetric(3, (0.0, 1.0), include_background=False)
    alone.update(u[mask].view(1, -1), pred[mask].view(1, -1), target[mask].view(1, -1))
    for name, value in alone.state_tensors().items():
        assert torch.equal(getattr(masked, name), value), name
    assert masked.compute()["voxels"] == int(mask.sum())


def test_merge_in_any_order_equals_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    u, pred, target = _quantised_case(5)
    whole = UncertaintyMetric(3, (0.0, 1.0), include_background=False, n_bins=2**12)
    whole.update(u, pred, target)
    parts = []
    for rows in (slice(0, 1), slice(1, 2)):
        for cols in (slice(0, 700), slice(700, None)):
            part = UncertaintyMetric(3, (0.0, 1.0), include_background=False, n_bins=2**12)
            part.update(u[rows, cols], pred[rows, cols], target[rows, cols])
            parts.append(part)
    forward = UncertaintyMetric(3, (0.0, 1.0), include_background=False, n_bins=2**12)
    for p in parts:
        forward.merge(p)
    backward = UncertaintyMetric(3, (0.0, 1.0), include_background=False, n_bins=2**12)
    for p in reversed(parts):
        backward.merge(p)
    monkeypatch.setattr(uncertainty_module, "_CHUNK", 123)  # the chunked update path
    chunked = UncertaintyMetric(3, (0.0, 1.0), include_background=False, n_bins=2**12)
    chunked.update(u, pred, target)
    for other in (forward, backward, chunked):
        for name, value in whole.state_tensors().items():
            if name == "sums":  # a float sum of uncertainties: order changes the last bits
                torch.testing.assert_close(getattr(other, name), value, rtol=1e-14, atol=0)
            else:
                assert torch.equal(getattr(other, name), value), name
    a, b = whole.compute(), forward.compute()
    assert a["aurc"] == b["aurc"] and a["auroc"] == b["auroc"] and a["qu_brats"] == b["qu_brats"]
    with pytest.raises(ValueError, match="same configuration"):
        whole.merge(UncertaintyMetric(3, (0.0, 2.0), include_background=False, n_bins=2**12))


def test_bad_input_is_refused_and_empty_metrics_are_nan() -> None:
    metric = UncertaintyMetric(2, (0.0, 1.0), include_background=False)
    out = metric.compute()
    assert math.isnan(out["aurc"]) and math.isnan(out["auroc"]) and math.isnan(out["ueo_best"])
    with pytest.raises(ValueError, match="NaN"):
        metric.update(torch.tensor([[float("nan")]]), torch.tensor([[0]]), torch.tensor([[0]]))
    with pytest.raises(ValueError, match="labels must lie"):
        metric.update(torch.tensor([[0.5]]), torch.tensor([[2]]), torch.tensor([[0]]))
    with pytest.raises(ValueError, match="shapes differ"):
        metric.update(torch.tensor([[0.5, 0.1]]), torch.tensor([[0]]), torch.tensor([[0]]))
    with pytest.raises(ValueError, match="value_range"):
        UncertaintyMetric(2, (1.0, 1.0))
    assert max_uncertainty("one_minus_max", 4) == 0.75 and max_uncertainty("mutual_info", 3) == math.log(3)


def test_case_level_correlation_against_numpy() -> None:
    mean_u = [0.1, 0.2, 0.3, 0.4, float("nan"), 0.35]
    dice = [0.9, 0.8, 0.85, 0.5, 0.7, 0.8]
    out = uncertainty_dice_correlation(mean_u, dice)
    u, d = np.array([0.1, 0.2, 0.3, 0.4, 0.35]), np.array([0.9, 0.8, 0.85, 0.5, 0.8])
    assert out["n_cases"] == 5
    assert out["pearson"] == pytest.approx(np.corrcoef(u, d)[0, 1], abs=1e-12)
    # ranks by hand: u -> 1 2 3 5 4; Dice -> 5 2.5 4 1 2.5 (0.8 twice shares ranks 2 and 3)
    ranks_u, ranks_d = np.array([1, 2, 3, 5, 4.0]), np.array([5, 2.5, 4, 1, 2.5])
    assert out["spearman"] == pytest.approx(np.corrcoef(ranks_u, ranks_d)[0, 1], abs=1e-12)
    assert out["spearman"] < 0 and out["pearson"] < 0
    assert math.isnan(uncertainty_dice_correlation([0.1, 0.2], [0.5, 0.6])["pearson"])


def test_saved_state_round_trips_through_json() -> None:
    import json

    metric = UncertaintyMetric(2, (0.0, 1.0), include_background=False, n_bins=64, qu_thresholds=(100, 50, 0))
    metric.update(U10, PRED10, GT10)
    again = UncertaintyMetric.from_dict(json.loads(json.dumps(metric.to_dict())))
    assert again.config() == metric.config()
    for name, value in metric.state_tensors().items():
        assert torch.equal(getattr(again, name), value), name
    assert again.compute() == metric.compute()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_state_equals_cpu_state() -> None:
    u, pred, target = _quantised_case(6, classes=3)
    mask = target > 0
    cpu = UncertaintyMetric(3, (0.0, 1.0), include_background=False)
    cpu.update(u, pred, target, mask=mask)
    gpu = UncertaintyMetric(3, (0.0, 1.0), include_background=False).to("cuda")
    gpu.update(u.cuda(), pred.cuda(), target.cuda(), mask=mask.cuda())
    assert gpu.histogram.is_cuda
    for name, value in cpu.state_tensors().items():
        torch.testing.assert_close(getattr(gpu, name).cpu(), value, rtol=1e-14, atol=0)
    assert gpu.compute()["qu_brats"] == cpu.compute()["qu_brats"]


def test_a_bad_chunk_leaves_the_state_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uncertainty_module, "_CHUNK", 4)
    metric = UncertaintyMetric(2, (0.0, 1.0), include_background=False)
    u = U10.clone()
    u[0, 9] = float("inf")  # in the last chunk, after two good ones
    with pytest.raises(ValueError, match="infinite"):
        metric.update(u, PRED10, GT10)
    assert all(int(t.count_nonzero()) == 0 for t in metric.state_tensors().values())
