"""The new measures on CUDA tensors give the CPU float64 results (device paths: scatter/bincount,
bucketize, searchsorted, unique, cdist, the GPU distance transform)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segcalib.metrics.adaptive import AdaptiveCalibrationError, adaptive_calibration_error
from segcalib.metrics.kernel_calibration import kernel_calibration_error
from segcalib.metrics.medpy_compat import per_class_scores
from segcalib.metrics.monai_calibration import monai_calibration_error
from segcalib.metrics.nsd import compute_surface_dice
from segcalib.metrics.scores import ScoreMetric, proper_scores
from segcalib.metrics.segmentation_metric import CASE_KEYS, SegmentationMetric
from segcalib.metrics.smooth_ece import SmoothECE, smooth_ece
from tests.metrics.test_calibration import make_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SPACING = (1.0, 0.8, 2.5)


def close(a, b, tol: float = 1e-10) -> None:
    if isinstance(a, dict):
        for key in a:
            close(a[key], b[key], tol)
        return
    torch.testing.assert_close(torch.as_tensor(a).cpu(), torch.as_tensor(b).cpu(), rtol=tol, atol=tol, equal_nan=True)


def test_calibration_measures_on_cuda() -> None:
    probs, target = make_batch((12, 11, 9), batch=2, seed=1)
    cuda_p, cuda_t = probs.cuda(), target.cuda()
    for mode in ("top", "classwise"):
        close(adaptive_calibration_error(cuda_p, cuda_t, mode=mode), adaptive_calibration_error(probs, target, mode=mode))
        close(
            adaptive_calibration_error(cuda_p, cuda_t, mode=mode, exact=False),
            adaptive_calibration_error(probs, target, mode=mode, exact=False),
        )
        streaming = AdaptiveCalibrationError(4, mode=mode)
        streaming.update(cuda_p, cuda_t)
        close(streaming.compute(), adaptive_calibration_error(probs, target, mode=mode, exact=False))
    close(monai_calibration_error(cuda_p, cuda_t), monai_calibration_error(probs, target))
    close(smooth_ece(cuda_p, cuda_t), smooth_ece(probs, target))
    smooth = SmoothECE(4)
    smooth.update(cuda_p, cuda_t)
    close(smooth.compute(), smooth_ece(probs, target, exact=False))
    close(
        kernel_calibration_error(cuda_p, cuda_t, max_samples=1000, sample=True),
        kernel_calibration_error(probs, target, max_samples=1000, sample=True),
    )
    close(proper_scores(cuda_p, cuda_t, per_image=True), proper_scores(probs, target, per_image=True))
    scores = ScoreMetric(4)
    scores.update(cuda_p, cuda_t)
    close(scores.compute()["brier"], proper_scores(probs, target)["brier"])


def test_segmentation_measures_on_cuda() -> None:
    probs, target = make_batch((16, 18, 12), batch=2, seed=2)
    pred = probs.argmax(1)
    close(
        compute_surface_dice(pred.cuda(), target.cuda(), 4, 1.5, SPACING, include_background=False),
        compute_surface_dice(pred, target, 4, 1.5, SPACING, include_background=False),
    )
    close(
        per_class_scores(probs.cuda(), target.cuda(), 4, SPACING, include_background=False),
        per_class_scores(probs, target, 4, SPACING, include_background=False),
    )
    on_gpu, on_cpu = SegmentationMetric(4, include_background=False), SegmentationMetric(4, include_background=False)
    on_gpu.update(probs.cuda(), target.cuda(), spacing=SPACING)
    on_cpu.update(probs, target, spacing=SPACING)
    got, want = on_gpu.compute(), on_cpu.compute()
    close(got["dice_pooled"], want["dice_pooled"])
    for key in CASE_KEYS:
        close(got["per_case"][key], want["per_case"][key])
    assert np.isfinite(want["per_case"]["hd95"].numpy()).any()
