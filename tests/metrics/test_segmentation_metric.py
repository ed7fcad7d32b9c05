"""SegmentationMetric against float64 NumPy/SciPy references; any split, merge order and process count."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segcalib.metrics.segmentation_metric import CASE_KEYS, SegmentationMetric
from tests.metrics._reference import blobs, ref_dice, ref_surface
from tests.metrics.test_nsd import ref_nsd

C = 4
SPACINGS = [(1.0, 0.8, 2.5), (0.6, 1.0, 1.2), (1.0, 1.0, 1.0), (2.0, 0.7, 0.9)]


def make_cases(n: int = 4, shape=(14, 15, 10), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    gt = np.stack([blobs(shape, C, rng) for _ in range(n)])
    pred = np.stack([blobs(shape, C, rng) for _ in range(n)])
    pred[1][pred[1] == 3] = 0  # class 3 predicted empty in case 1 (present in the ground truth)
    if n > 2:
        gt[2][gt[2] == 2] = 1
        pred[2][pred[2] == 2] = 1  # class 2 absent from both in case 2
    return pred, gt


def reference(pred: np.ndarray, gt: np.ndarray, taus, first: int = 1) -> dict[str, np.ndarray]:
    out = {key: [] for key in CASE_KEYS}
    for b in range(pred.shape[0]):
        sp = SPACINGS[b]
        out["dice"].append(ref_dice(pred[b], gt[b], C)[first:])
        mm = [ref_surface(pred[b] == k, gt[b] == k, sp) for k in range(first, C)]
        vox = [ref_surface(pred[b] == k, gt[b] == k, (1.0, 1.0, 1.0)) for k in range(first, C)]
        for key in ("hd", "hd95", "assd"):
            out[key].append([m[key] for m in mm])
        out["hd95_voxels"].append([v["hd95"] for v in vox])
        out["nsd"].append([ref_nsd(pred[b] == k, gt[b] == k, t, sp) for k, t in zip(range(first, C), taus)])
    return {key: np.array(v, dtype=float) for key, v in out.items()}


def assert_same(got: dict, want: dict, rtol: float = 1e-12) -> None:
    for key in CASE_KEYS:
        np.testing.assert_allclose(got["per_case"][key].numpy(), want[key], rtol=rtol, atol=1e-12, equal_nan=True, err_msg=key)


def test_matches_references_and_empty_conventions() -> None:
    pred, gt = make_cases()
    taus = (1.0, 2.0, 0.5)
    metric = SegmentationMetric(C, include_background=False, nsd_tolerance_mm=taus)
    metric.update(torch.from_numpy(pred), torch.from_numpy(gt), spacing=SPACINGS, case_ids=list("abcd"))
    out = metric.compute()
    want = reference(pred, gt, taus)
    assert_same(out, want)
    assert out["case_ids"] == list("abcd") and out["classes"] == [1, 2, 3]
    inter = [((pred == k) & (gt == k)).sum() for k in range(1, C)]
    sizes = [(pred == k).sum() + (gt == k).sum() for k in range(1, C)]
    np.testing.assert_allclose(out["dice_pooled"].numpy(), 2 * np.array(inter) / np.array(sizes), rtol=1e-15)
    # case 1, class 3: predicted empty -> Dice 0, distances inf, NSD 0; case 2, class 2: NaN everywhere
    assert out["per_case"]["dice"][1, 2] == 0 and math.isinf(out["per_case"]["hd95"][1, 2])
    assert out["per_case"]["nsd"][1, 2] == 0
    assert all(math.isnan(out["per_case"][key][2, 1]) for key in CASE_KEYS)
    assert int(out["n_nan"]["hd"][1]) == 1 and int(out["n_inf"]["hd"][2]) == 1
    assert math.isinf(out["mean"]["hd"][2])
    assert float(out["mean"]["dice"][1]) == pytest.approx(np.nanmean(want["dice"][:, 1]), rel=1e-12)


def test_probabilities_one_hot_and_dtypes_give_the_same() -> None:
    pred, gt = make_cases(n=2, shape=(20, 18), seed=3)
    spacing = (0.9, 1.4)
    onehot = torch.nn.functional.one_hot(torch.from_numpy(pred), C).movedim(-1, 1)
    rng = np.random.default_rng(0)
    probs = (onehot.double() * 3 + torch.from_numpy(rng.uniform(size=onehot.shape))).softmax(1)
    results = []
    for p, t in (
        (torch.from_numpy(pred), torch.from_numpy(gt)),
        (torch.from_numpy(pred).unsqueeze(1), torch.from_numpy(gt).unsqueeze(1)),
        (onehot.float(), torch.from_numpy(gt)),
        (probs, torch.from_numpy(gt)),
        (probs.float(), torch.from_numpy(gt).int()),
    ):
        m = SegmentationMetric(C, include_background=True)
        m.update(p, t, spacing=spacing)
        results.append(m.compute())
    for other in results[1:]:
        for key in CASE_KEYS:
            torch.testing.assert_close(other["per_case"][key], results[0]["per_case"][key], equal_nan=True)
    assert results[0]["per_case"]["dice"].shape == (2, C)


def test_any_split_and_merge_order() -> None:
    pred, gt = make_cases()
    p, g = torch.from_numpy(pred), torch.from_numpy(gt)
    whole = SegmentationMetric(C, include_background=False)
    whole.update(p, g, spacing=SPACINGS)
    want = whole.compute()
    parts = [SegmentationMetric(C, include_background=False) for _ in range(3)]
    parts[0].update(p[:1], g[:1], spacing=SPACINGS[:1], case_ids=[0])
    parts[1].update(p[1:3], g[1:3], spacing=SPACINGS[1:3], case_ids=[1, 2])
    parts[2].update(p[3:], g[3:], spacing=[SPACINGS[3]], case_ids=[3])
    for order in ([0, 1, 2], [2, 1, 0]):
        merged = SegmentationMetric(C, include_background=False)
        for i in order:
            merged.merge(parts[i])
        got = merged.compute()
        assert torch.equal(got["dice_pooled"], want["dice_pooled"])
        perm = [got["case_ids"].index(i) for i in range(4)]
        for key in CASE_KEYS:
            torch.testing.assert_close(got["per_case"][key][perm], want["per_case"][key], equal_nan=True)
            torch.testing.assert_close(got["mean"][key], want["mean"][key], equal_nan=True)
    merged.reset()
    assert merged.compute()["per_case"]["dice"].shape == (0, 3)
    with pytest.raises(ValueError):
        merged.merge(SegmentationMetric(C, include_background=False, nsd_tolerance_mm=2.0))
    with pytest.raises(ValueError, match="nsd_tolerance_mm"):
        SegmentationMetric(C, include_background=False, nsd_tolerance_mm=(1.0, 2.0))
