"""Every registered metric through the same checks (like tests/losses/test_all_losses.py).

- its value equals an independent float64 reference where one is cheap (NumPy, scikit-learn, MONAI);
- functional twin = streaming class, and any split of the cases / any merge order gives the same;
- float32 and float64 inputs agree; 2-process gloo equals one process (one spawned test for all);
- empty classes and masks follow the convention stated in the registry; CPU = CUDA (skipif).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from segcalib.metrics import INCLUDE_BACKGROUND, list_binnings, list_metrics, metric_spec, metric_value, streaming_metric
from segcalib.metrics.registry import BINNINGS
from tests.metrics._reference import blobs, ref_calibration, ref_dice, ref_surface

C = 3
SPACINGS = [(1.0, 1.0, 2.0), (0.8, 1.0, 1.5), (1.0, 1.0, 2.0), (1.2, 0.9, 1.0)]
STREAMING = [n for n in list_metrics() if metric_spec(n).stream is not None]


def make_cases(seed: int = 0, n: int = 4, shape=(10, 9, 7)) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` cases of blob labels and probabilities peaked near them (some voxels wrong)."""
    rng = np.random.default_rng(seed)
    labels = np.stack([blobs(shape, C, rng) for _ in range(n)])
    logits = 2.5 * np.eye(C)[labels].transpose(0, 4, 1, 2, 3)
    logits = logits + rng.normal(0, 1.2, logits.shape)
    probs = torch.softmax(torch.from_numpy(logits), 1)
    return probs, torch.from_numpy(labels)


def stream(name: str, probs: torch.Tensor, target: torch.Tensor, parts: list[slice], ib: bool = INCLUDE_BACKGROUND):
    metrics = []
    for part in parts:
        m = streaming_metric(name, C, ib)
        m.update(probs[part], target[part], SPACINGS[part])
        metrics.append(m)
    head = metrics[0]
    for m in metrics[1:]:
        head.merge(m)
    return head.compute()


# CalibrationMetric and the pooled functional ECE bin float64 inputs after a float32 cast of the
# confidences (their fast path): they agree with float64 references to ~1e-7 relative, not 1e-12.
CAST_RTOL = 2e-7


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, equal_nan=True)


def test_registry_names_and_binnings() -> None:
    want = {"ece", "mce", "cece", "ace", "monai_ece", "smooth_ece", "kce", "nll", "brier", "root_brier", "log_score",
            "dice", "hd", "hd95", "hd95_voxels", "assd", "nsd", "aurc", "auroc", "ueo", "qu_brats"}
    assert set(list_metrics()) == want
    assert list_binnings() == ["equal-width", "equal-mass"]
    assert list_metrics("uncertainty") == ["aurc", "auroc", "ueo", "qu_brats"]
    assert metric_spec("kce").stream is None and INCLUDE_BACKGROUND is True


def test_values_against_float64_references() -> None:
    from monai.metrics import CalibrationErrorMetric
    from sklearn.metrics import roc_auc_score

    probs, target = make_cases()
    p, y = probs.numpy(), target.numpy()
    ref = ref_calibration(p, y)
    for name in ("ece", "mce", "cece", "nll", "brier", "log_score"):
        assert float(metric_value(name, probs, target)) == pytest.approx(ref[{"log_score": "nll"}.get(name, name)], rel=CAST_RTOL)
    assert float(metric_value("root_brier", probs, target)) == pytest.approx(math.sqrt(ref["brier"]), rel=1e-10)
    pred = p.argmax(1)
    dice_ref = np.nanmean(np.stack([ref_dice(pred[b], y[b], C) for b in range(4)]), 0)
    np.testing.assert_allclose(metric_value("dice", probs, target).numpy(), dice_ref, rtol=1e-12)
    hd95_ref = np.mean([[ref_surface(pred[b] == k, y[b] == k, SPACINGS[b])["hd95"] for k in range(C)] for b in range(4)], 0)
    np.testing.assert_allclose(metric_value("hd95", probs, target, SPACINGS).numpy(), hd95_ref, rtol=1e-10)
    entropy = -(p * np.log(p)).sum(1).reshape(-1)
    auroc = roc_auc_score((pred != y).reshape(-1), entropy)
    assert float(metric_value("auroc", probs, target)) == pytest.approx(auroc, abs=2e-4)  # 2**14 bins
    monai = CalibrationErrorMetric(num_bins=20, include_background=True, metric_reduction="mean")
    monai(y_pred=probs, y=torch.nn.functional.one_hot(target, C).movedim(-1, 1).double())
    assert float(metric_value("monai_ece", probs, target)) == pytest.approx(float(monai.aggregate()), abs=1e-6)


@pytest.mark.parametrize("name", STREAMING)
def test_functional_equals_streaming_any_split_any_order(name: str) -> None:
    probs, target = make_cases(seed=1)
    whole = stream(name, probs, target, [slice(0, 4)])
    close(whole, metric_value(name, probs, target, SPACINGS), rtol=CAST_RTOL)
    close(stream(name, probs, target, [slice(0, 1), slice(1, 3), slice(3, 4)]), whole)
    close(stream(name, probs, target, [slice(3, 4), slice(0, 2), slice(2, 3)]), whole)


@pytest.mark.parametrize("name", list_metrics())
def test_float32_and_float64_inputs_agree(name: str) -> None:
    probs, target = make_cases(seed=2, n=2)
    got32 = metric_value(name, probs.float(), target, SPACINGS[:2])
    got64 = metric_value(name, probs, target, SPACINGS[:2])
    assert got32.dtype == torch.float64
    close(got32, got64, rtol=1e-4, atol=2e-4)  # histogram-based measures may move a voxel across a cell


@pytest.mark.parametrize("name", list_metrics("segmentation"))
def test_empty_class_conventions_segmentation(name: str) -> None:
    probs, target = make_cases(seed=3, n=2)
    target = target.clone()
    probs = probs.clone()
    # case 0: class 2 neither predicted nor present -> NaN; case 1: class 2 only predicted -> 0 / inf
    target[target == 2] = 1
    probs[0, 2] = 0.0
    probs[0] /= probs[0].sum(0, keepdim=True)
    per_case = []
    for b in range(2):
        per_case.append(metric_value(name, probs[b : b + 1], target[b : b + 1], SPACINGS[b : b + 1]))
    assert math.isnan(per_case[0][2])
    wrong = {"dice": 0.0, "nsd": 0.0}.get(name, math.inf)
    assert float(per_case[1][2]) == wrong
    both = metric_value(name, probs, target, SPACINGS[:2])
    assert float(both[2]) == wrong  # the NaN case is left out of the mean, the failure is not


@pytest.mark.parametrize("name", list_metrics("calibration") + list_metrics("uncertainty"))
def test_perfect_and_empty_conventions_voxelwise(name: str) -> None:
    _, target = make_cases(seed=4, n=2)
    target = torch.where(target == 2, torch.zeros_like(target), target)  # class 2 absent everywhere
    onehot = torch.nn.functional.one_hot(target, C).movedim(-1, 1).double()
    value = metric_value(name, onehot, target)
    expected = {"auroc": math.nan, "qu_brats": None}.get(name, 0.0)  # no errors: AUROC undefined
    if expected is None:
        assert 0.0 <= float(value) <= 1.0
    elif math.isnan(expected):
        assert math.isnan(float(value)), name
    else:
        assert float(value) == pytest.approx(0.0, abs=1e-9), name


def test_binning_schemes_on_a_hand_case() -> None:
    # 4 voxels, 2 classes: confidences 0.6, 0.6, 0.9, 0.9; correct: yes, no, yes, yes
    probs = torch.tensor([[0.6, 0.4, 0.1, 0.9], [0.4, 0.6, 0.9, 0.1]], dtype=torch.float64).view(1, 2, 2, 2)
    target = torch.tensor([[0, 0, 1, 0]]).view(1, 2, 2)
    want = 0.5 * abs(0.5 - 0.6) + 0.5 * abs(1.0 - 0.9)  # {0.6, 0.6} and {0.9, 0.9} in two bins
    assert float(BINNINGS["equal-width"].ece(probs, target, 10)) == pytest.approx(want, abs=1e-12)
    assert float(BINNINGS["equal-width"].ece(probs, target, 2)) == pytest.approx(0.0, abs=1e-12)  # one bin (0.5, 1]
    assert float(BINNINGS["equal-mass"].ece(probs, target, 2)) == pytest.approx(want, abs=1e-6)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        probs, target = make_cases(seed=5)
        mine = slice(2 * rank, 2 * rank + 2)
        out = {}
        for name in STREAMING:
            m = streaming_metric(name, C)
            m.update(probs[mine], target[mine], SPACINGS[mine])
            out[name] = m.compute().tolist()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_gloo_processes_equal_one_for_every_streaming_metric(tmp_path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    probs, target = make_cases(seed=5)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name in STREAMING:
            close(torch.tensor(got[name], dtype=torch.float64), stream(name, probs, target, [slice(0, 2), slice(2, 4)]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list_metrics())
def test_cuda_equals_cpu(name: str) -> None:
    probs, target = make_cases(seed=6, n=2)
    on_gpu = metric_value(name, probs.cuda(), target.cuda(), SPACINGS[:2])
    close(on_gpu, metric_value(name, probs, target, SPACINGS[:2]), rtol=1e-6, atol=1e-8)
