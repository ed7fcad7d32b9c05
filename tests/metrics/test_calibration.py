"""CalibrationMetric and the functional forms against float64 NumPy references, torchmetrics and MONAI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from segcalib.reports.calibration_json import calibration_json
from segcalib.metrics import CalibrationMetric, classwise_calibration_error, expected_calibration_error
from tests.metrics._reference import blobs, ref_boundary_band, ref_calibration

SPACING_3D = (1.0, 0.8, 2.5)
C = 4


def make_batch(
    shape: tuple[int, ...], batch: int = 2, num_classes: int = C, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blob label maps and probabilities that mostly, but not always, agree with them."""
    rng = np.random.default_rng(seed)
    labels = np.stack([blobs(shape, num_classes, rng) for _ in range(batch)])
    onehot = np.moveaxis(np.eye(num_classes)[labels], -1, 1)
    logits = 2.5 * onehot + 1.2 * rng.standard_normal(onehot.shape)
    probs = torch.from_numpy(logits).softmax(1).to(dtype)
    return probs, torch.from_numpy(labels)


def region_masks(target: np.ndarray, spacing, width: float = 2.0) -> dict[str, np.ndarray | None]:
    return {
        "all": None,
        "foreground": target != 0,
        "boundary": np.stack([ref_boundary_band(t, spacing, width) for t in target]),
    }


def assert_region_equal(got: dict, ref: dict, rtol: float = 1e-10) -> None:
    assert got["n_voxels"] == ref["n_voxels"]
    assert got["reliability"]["count"] == ref["reliability"]["count"]
    for key in ("ece", "mce", "cece", "nll", "brier"):
        np.testing.assert_allclose(got[key], ref[key], rtol=rtol, atol=1e-13, equal_nan=True, err_msg=key)
    np.testing.assert_allclose(got["cece_per_class"], ref["cece_per_class"], rtol=rtol, atol=1e-13, equal_nan=True)
    for key in ("confidence", "accuracy"):
        np.testing.assert_allclose(got["reliability"][key], ref["reliability"][key], rtol=rtol, equal_nan=True)


@pytest.mark.parametrize("include_background", [True, False])
def test_metric_matches_reference_3d_anisotropic(include_background: bool) -> None:
    probs, target = make_batch((14, 16, 10), batch=2)
    metric = CalibrationMetric(C, include_background=include_background)
    metric.update(probs, target, spacing=SPACING_3D)
    out = calibration_json(metric.compute())
    p, t = probs.double().numpy(), target.numpy()
    for name, mask in region_masks(t, SPACING_3D).items():
        assert_region_equal(out[name], ref_calibration(p, t, 15, mask, include_background))
    assert 0 < out["boundary"]["n_voxels"] < out["all"]["n_voxels"]


def test_metric_matches_reference_2d_per_case_spacing() -> None:
    probs, target = make_batch((30, 26), batch=3, num_classes=3, seed=1, dtype=torch.float64)
    spacings = [(0.7, 1.3), (1.0, 1.0), (2.0, 0.5)]
    metric = CalibrationMetric(3, n_bins=10, boundary_mm=1.5)
    metric.update(probs, target.unsqueeze(1), spacing=spacings)  # (B, 1, H, W) targets too
    out = calibration_json(metric.compute())
    p, t = probs.numpy(), target.numpy()
    band = np.stack([ref_boundary_band(t[b], spacings[b], 1.5) for b in range(3)])
    for name, mask in {"all": None, "foreground": t != 0, "boundary": band}.items():
        assert_region_equal(out[name], ref_calibration(p, t, 10, mask))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_probabilities_exactly_zero_one_and_on_bin_edges(dtype: torch.dtype) -> None:
    rows = [
        [1.0, 0.0, 0.0],
        [0.0, 1.0, 0.0],
        [1 / 15, 4 / 15, 10 / 15],
        [2 / 15, 2 / 15, 11 / 15],
        [7 / 15, 7 / 15, 1 / 15],  # tie: class 0 is the prediction
        [0.5, 0.5, 0.0],
        [1 / 3, 1 / 3, 1 / 3],
        [14 / 15, 1 / 15, 0.0],
    ]
    values = torch.tensor(rows, dtype=torch.float64).to(dtype)
    probs = values.t().reshape(1, 3, 2, 4)
    target = torch.tensor([0, 2, 2, 1, 1, 0, 2, 0]).reshape(1, 2, 4)
    metric = CalibrationMetric(3, regions=("all", "foreground"))
    metric.update(probs, target)
    out = calibration_json(metric.compute())
    p, t = probs.double().numpy(), target.numpy()
    assert_region_equal(out["all"], ref_calibration(p, t))
    assert_region_equal(out["foreground"], ref_calibration(p, t, mask=t != 0))
    counts = out["all"]["reliability"]["count"]
    if dtype == torch.float64:
        # confidences 1, 1, 10/15, 11/15, 7/15, 0.5, 1/3, 14/15 -> bins 14, 14, 9, 10, 6, 7, 4, 13
        expected = [0] * 15
        for b in (14, 14, 9, 10, 6, 7, 4, 13):
            expected[b] += 1
        assert counts == expected
        # class-wise: p = 0 lands in the first bin (SPEC), and so does p = 1/15
        # class 2 takes 0, 0, 10/15, 11/15, 1/15, 0, 1/3, 0
        assert out["all"]["classwise_reliability"][2]["count"][0] == 5


def test_empty_regions_give_nan_not_a_crash() -> None:
    probs, _ = make_batch((8, 9, 7), batch=2)
    target = torch.zeros(2, 8, 9, 7, dtype=torch.long)
    metric = CalibrationMetric(C)
    metric.update(probs, target, spacing=SPACING_3D)
    out = calibration_json(metric.compute())
    assert out["all"]["n_voxels"] == 2 * 8 * 9 * 7
    for name in ("foreground", "boundary"):
        region = out[name]
        assert region["n_voxels"] == 0
        assert all(math.isnan(region[k]) for k in ("ece", "mce", "cece", "nll", "brier"))
        assert region["reliability"]["count"] == [0] * 15
    assert math.isnan(out["media_foreground_ece"])
    json.dumps(out)  # NaN is written as NaN by the json module


def test_full_foreground_has_a_band_at_the_image_border() -> None:
    probs, _ = make_batch((9, 9, 9), batch=1)
    target = torch.ones(1, 9, 9, 9, dtype=torch.long)
    metric = CalibrationMetric(C, regions=("boundary",))
    metric.update(probs, target, spacing=(1.0, 1.0, 1.0))
    band = ref_boundary_band(target[0].numpy(), (1.0, 1.0, 1.0), 2.0)
    assert calibration_json(metric.compute())["boundary"]["n_voxels"] == int(band.sum()) == 9**3 - 3**3


def test_per_case_records_and_media_foreground_ece() -> None:
    probs, target = make_batch((10, 12, 8), batch=3, seed=4)
    target[1] = 0  # a volume without foreground: left out of the MedIA mean
    metric = CalibrationMetric(C)
    metric.update(probs[:2], target[:2], spacing=SPACING_3D, case_ids=["a", "b"])
    metric.update(probs[2:], target[2:], spacing=SPACING_3D)
    out = calibration_json(metric.compute())
    assert [c["case_id"] for c in out["per_case"]] == ["a", "b", 2]
    p, t = probs.double().numpy(), target.numpy()
    fg = []
    for b, case in enumerate(out["per_case"]):
        masks = region_masks(t[b : b + 1], SPACING_3D)
        for name, mask in masks.items():
            ref = ref_calibration(p[b : b + 1], t[b : b + 1], 15, mask)
            np.testing.assert_allclose(case["ece"][name], ref["ece"], rtol=1e-10, equal_nan=True)
            np.testing.assert_allclose(case["cece"][name], ref["cece"], rtol=1e-10, equal_nan=True)
            assert case["n_voxels"][name] == ref["n_voxels"]
        fg.append(case["foreground_ece"])
    assert math.isnan(fg[1])
    np.testing.assert_allclose(out["media_foreground_ece"], (fg[0] + fg[2]) / 2, rtol=1e-12)


def test_ignore_index_leaves_voxels_out_everywhere() -> None:
    probs, target = make_batch((10, 11, 9), batch=2, seed=5)
    ignored = torch.rand(target.shape, generator=torch.Generator().manual_seed(1)) < 0.2
    target = target.masked_fill(ignored, 255)
    metric = CalibrationMetric(C, ignore_index=255)
    metric.update(probs, target, spacing=SPACING_3D)
    out = calibration_json(metric.compute())
    p, t = probs.double().numpy(), target.numpy()
    valid = t != 255
    # an ignored voxel is not of class k, so a foreground voxel next to it is an edge voxel
    band = np.stack([ref_boundary_band(t[b], SPACING_3D, 2.0, classes=range(1, C)) for b in range(2)])
    masks = {"all": valid, "foreground": valid & (t != 0), "boundary": valid & band}
    for name, mask in masks.items():
        assert_region_equal(out[name], ref_calibration(p, np.where(valid, t, 0), 15, mask))
    assert expected_calibration_error(probs, target, ignore_index=255) == pytest.approx(out["all"]["ece"], rel=1e-12)


def test_functional_forms_equal_the_metric() -> None:
    probs, target = make_batch((9, 10, 11), batch=2, seed=6)
    metric = CalibrationMetric(C, regions=("all",), include_background=False)
    metric.update(probs, target)
    out = calibration_json(metric.compute())["all"]
    assert expected_calibration_error(probs, target) == pytest.approx(out["ece"], rel=1e-12)
    assert classwise_calibration_error(probs, target, include_background=False) == pytest.approx(out["cece"], rel=1e-12)


def test_matches_torchmetrics_top_label_ece() -> None:
    from torchmetrics.classification import MulticlassCalibrationError

    probs, target = make_batch((20, 18, 16), batch=2, seed=7)
    # conventions coincide when no confidence is 1.0 or on a bin edge (torchmetrics bins [a, b))
    conf = probs.amax(1).double() * 15
    assert (conf < 15).all() and (conf - conf.round()).abs().min() > 1e-6  # float32 edges
    ref = MulticlassCalibrationError(num_classes=C, n_bins=15, norm="l1")(probs, target)
    assert expected_calibration_error(probs, target) == pytest.approx(float(ref), rel=1e-5)
    ref_max = MulticlassCalibrationError(num_classes=C, n_bins=15, norm="max")(probs, target)
    metric = CalibrationMetric(C, regions=("all",))
    metric.update(probs, target)
    assert calibration_json(metric.compute())["all"]["mce"] == pytest.approx(float(ref_max), rel=1e-5)


@pytest.mark.parametrize("include_background", [True, False])
def test_matches_monai_calibration_error_metric(include_background: bool) -> None:
    from monai.metrics import CalibrationErrorMetric

    probs, target = make_batch((16, 14, 12), batch=2, seed=8)
    # MONAI's bin edges are k(1 + eps32)/M with (a, b] bins: identical unless a value sits on an edge
    scaled = probs.double() * 15
    above_edge = scaled - scaled.floor()
    assert not ((above_edge > 0) & (above_edge <= 15 * 1.2e-7)).any()
    onehot = torch.nn.functional.one_hot(target, C).movedim(-1, 1).float()
    monai = CalibrationErrorMetric(num_bins=15, include_background=include_background, metric_reduction="none")
    monai(probs, onehot)
    per_case = monai.aggregate().mean(1)  # (B, C) -> mean over the evaluated classes
    metric = CalibrationMetric(C, regions=("all",), include_background=include_background)
    metric.update(probs, target)
    out = calibration_json(metric.compute())
    got = [case["cece"]["all"] for case in out["per_case"]]
    np.testing.assert_allclose(got, per_case.double().numpy(), rtol=1e-4)
    # one volume: MONAI's mean over classes is the pooled CECE
    single = classwise_calibration_error(probs[:1], target[:1], include_background=include_background)
    assert single == pytest.approx(float(per_case[0]), rel=1e-4)


def _state(metric: CalibrationMetric) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in metric.state_tensors().items()}


@settings(max_examples=15, deadline=None)
@given(
    cuts=st.lists(st.integers(min_value=1, max_value=4), min_size=0, max_size=3, unique=True),
    order=st.permutations(range(5)),
    reverse_merge=st.booleans(),
)
def test_merge_equals_one_pass_for_any_split_and_order(cuts, order, reverse_merge) -> None:
    probs, target = make_batch((7, 8, 6), batch=5, num_classes=3, seed=10)
    order = list(order)
    probs, target = probs[order], target[order]
    one = CalibrationMetric(3)
    one.update(probs, target, spacing=SPACING_3D)
    bounds = [0, *sorted(cuts), 5]
    parts = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        part = CalibrationMetric(3)
        part.update(probs[lo:hi], target[lo:hi], spacing=SPACING_3D)
        parts.append(part)
    if reverse_merge:
        parts = parts[::-1]
    merged = parts[0]
    for part in parts[1:]:
        merged.merge(part)
    for name, value in _state(one).items():
        got = merged.state_tensors()[name]
        torch.testing.assert_close(got, value, rtol=1e-12, atol=1e-10)
        if name != "score_stats":
            assert torch.equal(got[..., 0], value[..., 0]) and torch.equal(got[..., 2], value[..., 2])  # counts
    a, b = calibration_json(one.compute()), calibration_json(merged.compute())
    for region in ("all", "foreground", "boundary"):
        assert a[region]["ece"] == pytest.approx(b[region]["ece"], rel=1e-12)
        assert a[region]["reliability"]["count"] == b[region]["reliability"]["count"]
    assert sorted(c["ece"]["all"] for c in a["per_case"]) == sorted(c["ece"]["all"] for c in b["per_case"])


def test_reset_and_merge_checks() -> None:
    probs, target = make_batch((6, 6, 6), batch=1)
    metric = CalibrationMetric(C)
    metric.update(probs, target)
    metric.reset()
    assert calibration_json(metric.compute())["all"]["n_voxels"] == 0 and calibration_json(metric.compute())["per_case"] == []
    with pytest.raises(ValueError):
        metric.merge(CalibrationMetric(C, n_bins=10))


@pytest.mark.parametrize(
    "make_args, error",
    [
        (lambda p, t: (p * 2, t), "probs must lie in"),
        (lambda p, t: (p, t + 4), "target labels"),
        (lambda p, t: (p[:, :3], t), "channels"),
        (lambda p, t: (p, t[:, :3]), "does not match"),
        (lambda p, t: (p[0, 0], t[0]), "probs must be"),
    ],
)
def test_input_validation(make_args, error: str) -> None:
    probs, target = make_batch((6, 7, 5), batch=1)
    metric = CalibrationMetric(C)
    with pytest.raises(ValueError, match=error):
        metric.update(*make_args(probs, target))


@pytest.mark.parametrize(
    "kwargs", [dict(n_bins=0), dict(regions=("all", "nope")), dict(regions=()), dict(boundary_mm=-1.0), dict(num_classes=0)]
)
def test_argument_validation(kwargs) -> None:
    args = {"num_classes": C, **kwargs}
    with pytest.raises(ValueError):
        CalibrationMetric(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu() -> None:
    probs, target = make_batch((24, 20, 16), batch=2, seed=11)
    cpu = CalibrationMetric(C)
    cpu.update(probs, target, spacing=SPACING_3D)
    gpu = CalibrationMetric(C)
    gpu.update(probs.cuda(), target.cuda(), spacing=SPACING_3D)
    assert gpu.top_stats.is_cuda
    for name, value in cpu.state_tensors().items():
        torch.testing.assert_close(gpu.state_tensors()[name].cpu(), value, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("fn", [expected_calibration_error, classwise_calibration_error])
def test_functional_validation(fn) -> None:
    probs, target = make_batch((6, 7, 5), batch=1)
    bad = probs.clone()
    bad[0, 1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="probs must lie"):
        fn(bad, target)
    with pytest.raises(ValueError, match="probs must lie"):
        fn(probs - 0.5, target)
    with pytest.raises(ValueError, match="target labels"):
        fn(probs, target - 1)
    with pytest.raises(ValueError, match="integer labels"):
        fn(probs, target.float())
    assert math.isfinite(fn(probs, target, validate_args=False))
