"""The streaming measures under torch.distributed: two gloo processes, each with half of the cases,
compute the same result as one process holding all of them (sums all-reduced and rows gathered
inside compute(), local state untouched)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from segcalib.metrics.adaptive import AdaptiveCalibrationError
from segcalib.metrics.monai_calibration import MonaiCalibrationError
from segcalib.metrics.scores import ScoreMetric
from segcalib.metrics.segmentation_metric import CASE_KEYS, SegmentationMetric
from segcalib.metrics.smooth_ece import SmoothECE
from tests.metrics.test_calibration import make_batch
from tests.metrics.test_segmentation_metric import SPACINGS, C, make_cases


def run_all(pred, gt, probs, target, spacings, case_ids) -> dict:
    seg = SegmentationMetric(C, include_background=False)
    seg.update(torch.from_numpy(pred), torch.from_numpy(gt), spacing=spacings, case_ids=case_ids)
    metrics = {
        "ace": AdaptiveCalibrationError(C),
        "smece": SmoothECE(C),
        "scores": ScoreMetric(C),
        "monai": MonaiCalibrationError(),
    }
    for m in metrics.values():
        m.update(probs, target)
    first = seg.compute()
    second = seg.compute()  # compute leaves the local state alone: no double counting
    scores = metrics["scores"].compute()
    return {
        "pooled": first["dice_pooled"].tolist(),
        "again": second["dice_pooled"].tolist(),
        "ids": first["case_ids"],
        "per_case": {k: v.tolist() for k, v in first["per_case"].items()},
        "local_voxels": float(seg.dice_counts[:, 2].sum()),
        "ace": metrics["ace"].compute()["ace"].item(),
        "smece": metrics["smece"].compute()["smece"].item(),
        "brier": scores["brier"].item(),
        "per_image_brier": scores["per_image"]["brier"].tolist(),
        "monai": float(metrics["monai"].compute()),
    }


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        pred, gt = make_cases()
        probs, target = make_batch((8, 9, 7), batch=4, num_classes=C, seed=12)
        mine = slice(2 * rank, 2 * rank + 2)
        out = run_all(pred[mine], gt[mine], probs[mine], target[mine], SPACINGS[mine], [2 * rank, 2 * rank + 1])
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_processes_equal_one(tmp_path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    pred, gt = make_cases()
    probs, target = make_batch((8, 9, 7), batch=4, num_classes=C, seed=12)
    want = run_all(pred, gt, probs, target, SPACINGS, [0, 1, 2, 3])
    locals_ = []
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        np.testing.assert_array_equal(got["pooled"], want["pooled"])
        np.testing.assert_array_equal(got["again"], want["pooled"])
        assert got["ids"] == [0, 1, 2, 3]
        for key in CASE_KEYS:
            want_key = np.array(want["per_case"][key], dtype=float)
            np.testing.assert_array_equal(np.array(got["per_case"][key], dtype=float), want_key)
        for key in ("ace", "smece", "brier", "monai"):
            assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-15), key
        np.testing.assert_allclose(got["per_image_brier"], want["per_image_brier"], rtol=1e-15)
        locals_.append(got["local_voxels"])
    assert sum(locals_) == want["local_voxels"]
