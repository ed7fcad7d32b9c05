"""Two gloo processes each update half of the cases; the synced result equals one process."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from segcalib.metrics import CalibrationMetric
from segcalib.reports.calibration_json import calibration_json
from tests.metrics.test_calibration import SPACING_3D, make_batch

WORLD = 2


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        probs, target = make_batch((8, 9, 7), batch=4, seed=12)
        metric = CalibrationMetric(4)
        mine = slice(2 * rank, 2 * rank + 2)
        metric.update(probs[mine], target[mine], spacing=SPACING_3D, case_ids=[f"case{2 * rank + i}" for i in range(2)])
        local_voxels = int(metric.top_stats[0, :, 0].sum())
        synced = calibration_json(metric.compute())  # compute() syncs; the local state stays local
        again = calibration_json(metric.compute())  # a second compute must not count twice
        restored = int(metric.top_stats[0, :, 0].sum())
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"synced": synced, "again": again, "local": local_voxels, "restored": restored}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_process_sync_equals_one_process(tmp_path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    probs, target = make_batch((8, 9, 7), batch=4, seed=12)
    single = CalibrationMetric(4)
    single.update(probs, target, spacing=SPACING_3D, case_ids=[f"case{i}" for i in range(4)])
    expected = calibration_json(single.compute())
    for rank in range(WORLD):
        with open(tmp_path / f"rank{rank}.json") as f:
            got = json.load(f)
        synced = got["synced"]
        assert got["again"]["all"]["n_voxels"] == got["synced"]["all"]["n_voxels"] == 4 * 8 * 9 * 7
        assert got["local"] == got["restored"] == 2 * 8 * 9 * 7
        for region in ("all", "foreground", "boundary"):
            a, b = synced[region], expected[region]
            assert a["n_voxels"] == b["n_voxels"]
            assert a["reliability"]["count"] == b["reliability"]["count"]
            for key in ("ece", "mce", "cece", "nll", "brier"):
                assert a[key] == pytest.approx(b[key], rel=1e-12)
        assert [c["case_id"] for c in synced["per_case"]] == [f"case{i}" for i in range(4)]
        assert synced["media_foreground_ece"] == pytest.approx(expected["media_foreground_ece"], rel=1e-12)
