"""MONAI-convention per-image class-wise calibration error: parity with MONAI 1.6 and float64 NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import CalibrationErrorMetric

from segcalib.metrics.monai_calibration import (
    METRIC_REDUCTIONS,
    MonaiCalibrationError,
    monai_calibration_error,
    monai_reduction,
)
from tests.metrics.test_calibration import make_batch


def onehot(target: torch.Tensor, c: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(target, c).movedim(-1, 1).float()


def ref_per_image(probs: np.ndarray, target: np.ndarray, n_bins: int, first: int) -> np.ndarray:
    """float64 loops; bins (i/M, (i+1)/M] with 0 in the first bin (equal to MONAI's away from edges)."""
    b, c = probs.shape[:2]
    out = np.zeros((b, c - first))
    for i in range(b):
        for k in range(first, c):
            p = probs[i, k].reshape(-1)
            y = (target[i].reshape(-1) == k).astype(float)
            bins = np.clip(np.ceil(p * n_bins) - 1, 0, n_bins - 1)
            total = 0.0
            for j in range(n_bins):
                sel = bins == j
                if sel.any():
                    total += sel.sum() * abs(p[sel].mean() - y[sel].mean())
            out[i, k - first] = total / p.size
    return out


@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("reduction", ["expected", "average", "maximum"])
def test_parity_with_monai(include_background: bool, reduction: str) -> None:
    probs, target = make_batch((12, 11, 9), batch=3, dtype=torch.float64, seed=2)
    ours = monai_calibration_error(probs, target, include_background=include_background, calibration_reduction=reduction)
    monai = CalibrationErrorMetric(include_background=include_background, calibration_reduction=reduction)
    want = monai._compute_tensor(probs, onehot(target, 4))
    np.testing.assert_allclose(ours.numpy(), want.double().numpy(), atol=1e-6, rtol=0)
    for red in METRIC_REDUCTIONS:
        metric = CalibrationErrorMetric(include_background=include_background, calibration_reduction=reduction,
                                        metric_reduction=red, get_not_nans=True)
        metric(y_pred=probs, y=onehot(target, 4))
        m_val, m_nn = metric.aggregate()
        s_val, s_nn = monai_reduction(ours, red)
        np.testing.assert_allclose(s_val.numpy(), m_val.double().numpy(), atol=1e-6, rtol=0)
        np.testing.assert_allclose(s_nn.numpy(), m_nn.double().numpy())


def test_values_on_bin_edges_follow_monai() -> None:
    # 0.05 * k are MONAI's float32 edges up to rounding: bucketize(right=False) puts an edge value below it
    vals = torch.tensor([0.0, 0.05, 0.1, 0.5, 0.95, 1.0, 0.3, 0.7], dtype=torch.float64)
    probs = torch.stack([1 - vals, vals]).view(1, 2, 8, 1)
    target = torch.tensor([0, 1, 1, 0, 1, 1, 0, 1]).view(1, 8, 1)
    for right in (False, True):
        for red in ("expected", "average", "maximum"):
            ours = monai_calibration_error(probs, target, calibration_reduction=red, right=right)
            want = CalibrationErrorMetric(calibration_reduction=red, right=right)._compute_tensor(probs, onehot(target, 2))
            np.testing.assert_allclose(ours.numpy(), want.double().numpy(), atol=1e-6, rtol=0)


def test_float64_reference_and_float32_input() -> None:
    probs, target = make_batch((10, 12), batch=2, num_classes=3, dtype=torch.float64, seed=4)
    ours = monai_calibration_error(probs, target, num_bins=10, include_background=False)
    np.testing.assert_allclose(ours.numpy(), ref_per_image(probs.numpy(), target.numpy(), 10, 1), rtol=1e-12)
    ours32 = monai_calibration_error(probs.float(), target, num_bins=10, include_background=False)
    np.testing.assert_allclose(ours32.numpy(), ours.numpy(), atol=1e-7)


def test_streaming_any_split_and_order() -> None:
    probs, target = make_batch((8, 9, 6), batch=4, seed=6)
    want = monai_reduction(monai_calibration_error(probs, target), "mean")[0]
    a, b = MonaiCalibrationError(), MonaiCalibrationError()
    a.update(probs[:3], target[:3])
    b.update(probs[3:], target[3:].unsqueeze(1))
    got_ab = MonaiCalibrationError().merge(a).merge(b).compute()
    got_ba = MonaiCalibrationError().merge(b).merge(a).compute()
    assert float(got_ab) == pytest.approx(float(want), rel=1e-12)
    assert float(got_ba) == pytest.approx(float(want), rel=1e-12)
    metric = MonaiCalibrationError(metric_reduction="none", get_not_nans=True)
    metric.update(probs, target)
    values, not_nans = metric.compute()
    assert values.shape == (4, 4) and bool(not_nans.all())
    metric.reset()
    with pytest.raises(ValueError, match="no images"):
        metric.compute()
    with pytest.raises(ValueError):
        a.merge(MonaiCalibrationError(num_bins=10))


def test_empty_image_is_nan_and_mean_reduction_skips_it() -> None:
    values = torch.tensor([[0.1, float("nan")], [float("nan"), float("nan")], [0.3, 0.5]], dtype=torch.float64)
    mean, n = monai_reduction(values, "mean")
    assert float(mean) == pytest.approx((0.1 + 0.4) / 2) and float(n) == 2
    assert float(monai_reduction(torch.full((2, 2), float("nan")), "mean")[0]) == 0.0  # MONAI: 0, not NaN
    empty = monai_calibration_error(torch.zeros(1, 2, 0, 3), torch.zeros(1, 0, 3, dtype=torch.long))
    assert torch.isnan(empty).all()
