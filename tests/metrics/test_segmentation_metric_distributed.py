"""SegmentationMetric under torch.distributed: two gloo processes, each with half of the cases,
compute the same result as one process holding all of them."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from segcalib.metrics.segmentation_metric import CASE_KEYS, SegmentationMetric
from tests.metrics.test_segmentation_metric import SPACINGS, C, make_cases


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        pred, gt = make_cases()
        mine = slice(2 * rank, 2 * rank + 2)
        metric = SegmentationMetric(C)
        metric.update(torch.from_numpy(pred[mine]), torch.from_numpy(gt[mine]), spacing=SPACINGS[mine], case_ids=[2 * rank, 2 * rank + 1])
        out = metric.compute()
        again = metric.compute()  # compute leaves the local state alone: no double counting
        local = metric.dice_counts.sum().item()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(
                {
                    "pooled": out["dice_pooled"].tolist(),
                    "again": again["dice_pooled"].tolist(),
                    "ids": out["case_ids"],
                    "per_case": {k: v.tolist() for k, v in out["per_case"].items()},
                    "local": local,
                },
                f,
            )
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_processes_equal_one(tmp_path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    pred, gt = make_cases()
    single = SegmentationMetric(C)
    single.update(torch.from_numpy(pred), torch.from_numpy(gt), spacing=SPACINGS)
    want = single.compute()
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        np.testing.assert_array_equal(got["pooled"], want["dice_pooled"].numpy())
        np.testing.assert_array_equal(got["again"], want["dice_pooled"].numpy())
        assert got["ids"] == [0, 1, 2, 3]
        for key in CASE_KEYS:
            np.testing.assert_array_equal(np.array(got["per_case"][key], dtype=float), want["per_case"][key].numpy())
    total = sum(json.loads((tmp_path / f"rank{r}.json").read_text())["local"] for r in range(2))
    assert total == float(single.dice_counts.sum())
