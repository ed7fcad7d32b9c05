"""Reports: values equal an independent recomputation from the exported files; self-contained
HTML; comparisons; NaN/inf survive the JSON round trip."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance
from scipy import ndimage

from segcalib.config import load_config
from segcalib.data import load_manifest
from segcalib.errors import DataError
from segcalib.inference.temperature import TemperatureRequest
from segcalib.export import ExportOptions, export
from segcalib.reports import compare, evaluate, read_report
from tests.synthetic import make_dataset, write_nifti


def _ece(conf: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """Reference ECE, bins (b/M, (b+1)/M], p = 0 in the first bin, as a plain loop."""
    total, n = 0.0, len(conf)
    bins = np.clip(np.ceil(conf * n_bins) - 1, 0, n_bins - 1)
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            total += sel.sum() / n * abs(correct[sel].mean() - conf[sel].mean())
    return total


def _boundary(label: np.ndarray, spacing, width: float = 2.0) -> np.ndarray:
    cross = ndimage.generate_binary_structure(3, 1)
    edges = np.zeros(label.shape, bool)
    for k in np.unique(label):
        if k == 0:
            continue
        mask = label == k
        edges |= mask ^ ndimage.binary_erosion(mask, cross)
    return ndimage.distance_transform_edt(~edges, sampling=spacing) <= width


@pytest.fixture(scope="module")
def evaluated(smoke_run: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("evaluated")
    manifest = load_config(smoke_run / "config.yaml").data.manifest
    export(smoke_run, manifest, root / "pred", ExportOptions(temperature=TemperatureRequest.parse("1.3")))
    report = evaluate(root / "pred", manifest, root / "report")
    return root, manifest, report


def test_report_equals_an_independent_recomputation(evaluated) -> None:
    root, manifest, report = evaluated
    (case,) = load_manifest(manifest).cases("test")
    probs = nib.load(str(root / "pred" / f"{case.case_id}_probs.nii.gz")).get_fdata(dtype=np.float64)
    label_img = nib.load(str(case.label))
    label = np.asarray(label_img.dataobj).astype(np.int64)
    spacing = [float(s) for s in label_img.header.get_zooms()[:3]]
    conf, pred = probs.max(-1), probs.argmax(-1)
    correct = (pred == label).astype(np.float64)
    fg, band = label > 0, _boundary(label, spacing)
    cal = report["calibration"]
    assert cal["all"]["ece"] == pytest.approx(_ece(conf.ravel(), correct.ravel()), abs=1e-6)
    assert cal["foreground"]["ece"] == pytest.approx(_ece(conf[fg], correct[fg]), abs=1e-6)
    assert cal["boundary"]["ece"] == pytest.approx(_ece(conf[band], correct[band]), abs=1e-6)
    assert cal["boundary"]["n_voxels"] == int(band.sum()) and cal["foreground"]["n_voxels"] == int(fg.sum())
    p_y = np.take_along_axis(probs, label[..., None], -1)[..., 0]
    assert cal["all"]["nll"] == pytest.approx(-np.log(np.clip(p_y, 1e-12, None)).mean(), rel=1e-6)
    onehot = np.eye(3)[label]
    assert cal["all"]["brier"] == pytest.approx(((probs - onehot) ** 2).sum(-1).mean(), rel=1e-6)
    cece = np.mean([_ece(probs[..., k].ravel(), (label == k).ravel().astype(float)) for k in range(3)])
    assert cal["all"]["cece"] == pytest.approx(cece, abs=1e-6)
    assert report["metadata"]["temperature"] == pytest.approx(1.3)

    classes = report["cases"][0]["classes"]
    for k in (1, 2):
        p, g = pred == k, label == k
        dice = 2 * (p & g).sum() / (p.sum() + g.sum()) if (p.sum() + g.sum()) else math.nan
        assert classes[k - 1]["dice"] == pytest.approx(dice, abs=1e-9, nan_ok=True)
        if p.any() and g.any():
            hd95 = compute_hausdorff_distance(
                torch.from_numpy(p)[None, None], torch.from_numpy(g)[None, None], percentile=95, spacing=list(spacing)
            ).item()
            assert classes[k - 1]["hd95"] == pytest.approx(hd95, rel=1e-5)
        else:
            assert math.isinf(classes[k - 1]["hd95"]) or math.isnan(classes[k - 1]["hd95"])


def test_report_files_and_json_round_trip(evaluated) -> None:
    root, _, report = evaluated
    loaded = read_report(root / "report" / "report.json")
    assert loaded["summary"].keys() == report["summary"].keys()
    text = (root / "report" / "report.json").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    json.loads(text)
    meta = loaded["metadata"]
    for key in ("run", "checkpoint", "temperature", "versions", "time", "class_names"):
        assert meta[key] is not None


def test_html_is_self_contained(evaluated) -> None:
    root, _, _ = evaluated
    html = (root / "report" / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and html.count("<img") >= 3 + 3 * 3
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", html)
    assert not re.search(r"url\((?!data:)", html) and "<script" not in html and "<link" not in html
    assert "Per case" in html and "boundary" in html


def test_comparison_of_two_exports(evaluated, smoke_run: Path, tmp_path: Path) -> None:
    root, manifest, _ = evaluated
    export(smoke_run, manifest, tmp_path / "pred", ExportOptions())
    evaluate(tmp_path / "pred", manifest, tmp_path / "report_t1")
    result = compare([root / "report", tmp_path / "report_t1" / "report.json"], tmp_path / "cmp")
    labels = [r["label"] for r in result["reports"]]
    assert len(labels) == 2 and any("(T=1.300)" in label for label in labels)
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert md.count("\n") == 4 and "ECE fg" in md
    html = (tmp_path / "cmp" / "comparison.html").read_text()
    assert "<img" in html and not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", html)


def test_comparison_refuses_reports_with_other_bins(evaluated, tmp_path: Path) -> None:
    root, manifest, _ = evaluated
    evaluate(root / "pred", manifest, tmp_path / "report_10", n_bins=10)
    with pytest.raises(DataError, match="different numbers of reliability bins"):
        compare([root / "report", tmp_path / "report_10"], tmp_path / "cmp")


def test_empty_prediction_gives_inf_and_counts(tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path / "data", 2, (12, 12, 8), None, {"training": 1, "test": 1})
    case = load_manifest(manifest).cases("test")[0]
    label = np.asarray(nib.load(str(case.label)).dataobj)
    probs = np.zeros(label.shape + (3,), np.float32)
    probs[..., 0] = 1.0  # predicts background everywhere
    (tmp_path / "pred").mkdir()
    write_nifti(tmp_path / "pred" / f"{case.case_id}_probs.nii.gz", probs)
    report = evaluate(tmp_path / "pred", manifest, tmp_path / "report")
    classes = report["cases"][0]["classes"]
    assert all(c["dice"] == 0 and math.isinf(c["hd95"]) for c in classes)
    assert report["counts"]["cases_with_inf"] == 1
    assert read_report(tmp_path / "report" / "report.json")["cases"][0]["classes"][0]["hd"] == math.inf


def test_a_missed_structure_makes_the_mean_distance_inf(tmp_path: Path) -> None:
    """SPEC §4: only NaN leaves the means; one case with an empty prediction (inf) must not vanish."""
    manifest = make_dataset(tmp_path / "data", 3, (12, 12, 8), None, {"training": 1, "test": 2})
    (tmp_path / "pred").mkdir()
    for i, case in enumerate(load_manifest(manifest).cases("test")):
        label = np.asarray(nib.load(str(case.label)).dataobj).astype(np.int64)
        probs = np.eye(3, dtype=np.float32)[label] if i == 0 else np.eye(3, dtype=np.float32)[np.zeros_like(label)]
        write_nifti(tmp_path / "pred" / f"{case.case_id}_probs.nii.gz", probs)
    report = evaluate(tmp_path / "pred", manifest, tmp_path / "report")
    for summary in report["segmentation"]["per_class"].values():
        assert summary["dice"] == pytest.approx(0.5)  # perfect (1) and missed (0)
        assert math.isinf(summary["hd95"]) and summary["hd95_n_inf"] == 1
    assert math.isinf(report["segmentation"]["mean_foreground"]["hd95"])
    assert math.isinf(report["summary"]["hd95"])


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p: p[..., :2], "2 classes (shape (12, 12, 8, 2), class axis last), expected 3 by the manifest"),
        (lambda p: p * 2, "not probabilities"),
        (lambda p: np.concatenate([p[..., :1] * 0.5, p[..., 1:]], -1), "not summing to 1"),
    ],
)
def test_bad_prediction_files_are_named(tmp_path: Path, mutate, message: str) -> None:
    manifest = make_dataset(tmp_path / "data", 2, (12, 12, 8), None, {"training": 1, "test": 1})
    case = load_manifest(manifest).cases("test")[0]
    probs = np.random.default_rng(0).dirichlet(np.ones(3), size=(12, 12, 8)).astype(np.float32)
    (tmp_path / "pred").mkdir()
    write_nifti(tmp_path / "pred" / f"{case.case_id}_probs.nii.gz", mutate(probs).astype(np.float32))
    with pytest.raises(DataError) as info:
        evaluate(tmp_path / "pred", manifest, tmp_path / "report")
    assert message in str(info.value) and f"{case.case_id}_probs.nii.gz" in str(info.value)


def test_missing_prediction_is_named(tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path / "data", 3, (12, 12, 8), None, {"training": 1, "test": 2})
    first, second = load_manifest(manifest).cases("test")
    probs = np.random.default_rng(0).dirichlet(np.ones(3), size=(12, 12, 8)).astype(np.float32)
    (tmp_path / "pred").mkdir()
    with pytest.raises(DataError, match=r"pred: no prediction maps found \(expected <case>_probs.nii.gz"):
        evaluate(tmp_path / "pred", manifest, tmp_path / "report")  # an empty folder
    write_nifti(tmp_path / "pred" / f"{first.case_id}_probs.nii.gz", probs)
    with pytest.raises(DataError, match=f"case {second.case_id}: no prediction map in .*pred .*looked for "
                                        f"{second.case_id}.nii.gz \\(or {second.case_id}_probs.nii.gz\\)"):
        evaluate(tmp_path / "pred", manifest, tmp_path / "report")


def test_two_process_evaluation_equals_one_process(evaluated, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    root, manifest, _ = evaluated
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "segcalib",
         "evaluate", "--predictions", str(root / "pred"), "--manifest", str(manifest), "--output", str(tmp_path / "two")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = read_report(root / "report" / "report.json"), read_report(tmp_path / "two" / "report.json")
    assert two["metadata"]["processes"] == 2 and one["metadata"]["processes"] == 1
    for region in ("all", "foreground", "boundary"):
        for key in ("ece", "cece", "nll", "brier", "n_voxels"):
            assert two["calibration"][region][key] == pytest.approx(one["calibration"][region][key], rel=1e-12)
    assert [c["case"] for c in two["cases"]] == [c["case"] for c in one["cases"]]
    assert two["segmentation"] == one["segmentation"]


def test_overlapped_evaluation_writes_the_report_of_the_sequential_one(smoke_run: Path, tmp_path: Path) -> None:
    """Reading case i+1 while the metrics of case i run changes nothing in the report (4 cases)."""
    manifest = load_config(smoke_run / "config.yaml").data.manifest
    export(smoke_run, manifest, tmp_path / "pred", ExportOptions(split="training"))
    reports = {}
    for overlap in (False, True):
        evaluate(tmp_path / "pred", manifest, tmp_path / f"report_{overlap}", split="training", overlap=overlap)
        reports[overlap] = json.loads((tmp_path / f"report_{overlap}" / "report.json").read_text())
        for key in ("seconds", "time"):
            reports[overlap]["metadata"].pop(key)
    assert len(reports[True]["cases"]) == 4
    assert json.dumps(reports[True], sort_keys=True) == json.dumps(reports[False], sort_keys=True)  # NaN == NaN here


def test_comparison_labels_name_a_calibrator_once() -> None:
    from pathlib import Path

    from segcalib.reports.compare import label_for

    def report(method, temperature=None):
        return {"metadata": {"run": "/x/runs/demo/ce_dice", "temperature": temperature,
                             "calibrator": {"method": method} if method else None}}

    folder = Path("/x/runs/demo/ce_dice/reports")
    assert label_for(report("boundary_temperature"), folder / "test_cal_boundary_temperature" / "report.json") \
        == "ce_dice / test_cal_boundary_temperature"
    assert label_for(report("isotonic"), folder / "test_cal_auto" / "report.json") == "ce_dice / test_cal_auto (isotonic)"
    assert label_for(report(None, 1.25), folder / "test_Tfit_all" / "report.json") == "ce_dice / test_Tfit_all (T=1.250)"
