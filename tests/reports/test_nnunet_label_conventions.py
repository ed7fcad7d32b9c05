"""nnU-Net's label conventions in calibrate fit, apply and evaluate: the ``ignore`` label's voxels
count nowhere (values derived by hand, or by a float64 fit on the kept voxels only), and a
region-based dataset is refused at the boundary with exit 2, naming the key and the file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from segcalib.cli import main
from segcalib.data import load_manifest
from segcalib.data.check import check_manifest
from segcalib.errors import DataError
from segcalib.export.posthoc import FitOptions, apply_to_predictions, fit_on_predictions
from segcalib.reports import evaluate
from tests.synthetic import LPS_ANISO, write_nifti

LABELS = {"background": 0, "organ": 1, "ignore": 2}  # nnU-Net v2: ignore is the largest value


def _dataset(root: Path, labels: dict, volumes: dict[str, np.ndarray], extra: dict | None = None) -> Path:
    entries = []
    for case_id, label in volumes.items():
        write_nifti(root / "images" / f"{case_id}.nii.gz", label.astype(np.float32), LPS_ANISO)
        write_nifti(root / "labels" / f"{case_id}.nii.gz", label.astype(np.uint8), LPS_ANISO)
        entries.append({"image": f"images/{case_id}.nii.gz", "label": f"labels/{case_id}.nii.gz", "case_id": case_id})
    manifest = root / "dataset.json"
    manifest.write_text(json.dumps({"labels": labels, "training": [], "test": entries, **(extra or {})}))
    return manifest


def test_the_ignore_label_is_not_a_class(tmp_path: Path) -> None:
    manifest = load_manifest(_dataset(tmp_path, LABELS, {"a": np.array([0, 1, 2, 2], np.uint8).reshape(2, 2, 1)}))
    assert (manifest.num_classes, manifest.class_names, manifest.ignore_label) == (2, ["background", "organ"], 2)
    checked = check_manifest(manifest)  # its voxels are declared, not "undeclared values"
    assert checked.reports[0].problems == [] and checked.reports[0].label_counts == {0: 1, 1: 1, 2: 2}
    assert "labels:   0=background, 1=organ, 2=ignore (not a class)" in checked.format()
    with pytest.raises(DataError, match=r"dataset.json: label 'ignore' = 1 must be larger than every class value"):
        load_manifest(_dataset(tmp_path / "low", {"background": 0, "ignore": 1, "organ": 2}, {"a": np.zeros((2, 2, 1))}))


def test_evaluate_leaves_the_ignored_voxels_out_of_every_metric(tmp_path: Path) -> None:
    """Four voxels: background (p = 0.9, 0.1), organ (0.25, 0.75), and two ignored voxels whose
    probabilities (0.3, 0.7) and (0.6, 0.4) would change every number if they counted."""
    label = np.array([0, 1, 2, 2], np.uint8).reshape(2, 2, 1)
    probs = np.array([[0.9, 0.1], [0.25, 0.75], [0.3, 0.7], [0.6, 0.4]], np.float32).reshape(2, 2, 1, 2)
    manifest = _dataset(tmp_path / "data", LABELS, {"a": label})
    write_nifti(tmp_path / "maps" / "a.nii.gz", probs, LPS_ANISO)
    report = evaluate(tmp_path / "maps", manifest, tmp_path / "report", write_html=False, binning="equal-mass")
    pooled = report["calibration"]["all"]
    # kept voxels only: both correct, confidences 0.9 (bin 13 of 15) and 0.75 (bin 11)
    assert pooled["ece"] == pytest.approx((0.1 + 0.25) / 2, abs=1e-6)
    assert pooled["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.75)) / 2, abs=1e-6)
    assert pooled["brier"] == pytest.approx((2 * 0.1**2 + 2 * 0.25**2) / 2, abs=1e-6)
    assert report["calibration_equal_mass"]["all"]["ece"] == pytest.approx(0.175, abs=1e-3)
    assert report["cases"][0]["calibration"]["n_voxels"]["all"] == 2
    assert report["cases"][0]["classes"][0]["dice"] == 1.0  # the predicted organ at an ignored voxel is no FP
    assert report["metadata"]["ignore_label"] == 2


def _fit_data(root: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(4)
    label = rng.integers(0, 3, size=(6, 5, 4)).astype(np.uint8)  # a third of the voxels ignored
    logits = rng.normal(0, 2, size=(6, 5, 4, 2)).astype(np.float32)
    logits[..., 1] += 2.0 * (label == 1)
    logits[label == 2, 1] += 8.0  # the ignored voxels: confidently organ, which would pull T up
    manifest = _dataset(root / "data", LABELS, {"a": label})
    write_nifti(root / "maps" / "a_logits.nii.gz", logits, LPS_ANISO)
    return manifest, logits, label


def test_calibrate_fit_fits_on_the_kept_voxels_only(tmp_path: Path) -> None:
    manifest, logits, label = _fit_data(tmp_path)
    record = fit_on_predictions(tmp_path / "maps", manifest, tmp_path / "cal",
                                FitOptions(method="temperature", split="test", device="cpu"))
    kept = label != 2
    z, y = logits[kept].astype(np.float64), label[kept].astype(np.int64)

    def nll(t: float) -> float:
        s = z / t
        s = s - s.max(1, keepdims=True)
        return float(-(s[np.arange(y.size), y] - np.log(np.exp(s).sum(1))).mean())

    reference = minimize_scalar(nll, bounds=(0.05, 20.0), method="bounded", options={"xatol": 1e-9}).x
    assert record["params"]["temperature"] == pytest.approx(reference, rel=1e-4)
    assert record["ignore_label"] == 2
    out = apply_to_predictions(tmp_path / "cal", tmp_path / "maps", tmp_path / "calibrated", progress=False)
    assert out["status"] == "complete"


def test_a_label_value_that_is_neither_class_nor_ignore_names_the_file(tmp_path: Path) -> None:
    manifest, logits, label = _fit_data(tmp_path)
    bad = label.copy()
    bad[0, 0, 0] = 5
    write_nifti(tmp_path / "data" / "labels" / "a.nii.gz", bad, LPS_ANISO)
    with pytest.raises(DataError, match=r"labels/a.nii.gz: label value\(s\) 5 are not classes of the manifest "
                                        r"\(0..1 or the ignore label 2\)"):
        fit_on_predictions(tmp_path / "maps", manifest, tmp_path / "cal", FitOptions(method="temperature", split="test"))


@pytest.mark.parametrize("extra, labels, key", [
    ({"regions_class_order": [1, 2]}, {"background": 0, "whole": [1, 2], "core": 2}, "'regions_class_order'"),
    ({}, {"background": 0, "whole": [1, 2], "core": 2}, "'labels' entry 'whole' (a list of values)"),
])
def test_region_based_datasets_are_refused_with_exit_2(tmp_path: Path, capsys, extra, labels, key) -> None:
    manifest = _dataset(tmp_path / "data", labels, {"a": np.zeros((2, 2, 1), np.uint8)}, extra)
    write_nifti(tmp_path / "maps" / "a.nii.gz", np.full((2, 2, 1, 3), 1 / 3, np.float32), LPS_ANISO)
    inputs = ["--predictions", str(tmp_path / "maps"), "--manifest", str(manifest)]
    for command in (["evaluate", *inputs, "--output", str(tmp_path / "report")],
                    ["calibrate", "fit", *inputs, "--split", "test", "--method", "temperature", "--output", str(tmp_path / "c")]):
        code = main(command)
        err = capsys.readouterr().err
        assert code == 2 and f"{manifest}: {key}: a region-based nnU-Net dataset" in err and "Traceback" not in err


def test_a_region_based_nnunet_prediction_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "pred"
    folder.mkdir()
    np.savez_compressed(folder / "a.npz", probabilities=np.full((3, 1, 2, 2), 0.5, np.float32))
    write_nifti(folder / "a.nii.gz", np.zeros((2, 2, 1), np.uint8))
    (folder / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "whole": [1, 2]},
                                                     "regions_class_order": [1, 2]}))
    from segcalib.predictions import open_predictions

    with pytest.raises(DataError, match=r"pred/dataset.json: 'regions_class_order': a region-based nnU-Net dataset"):
        open_predictions(folder)


def test_conformal_fit_refuses_an_ignore_label_with_exit_2(tmp_path: Path, capsys) -> None:
    manifest, _, _ = _fit_data(tmp_path)
    code = main(["conformal", "fit", "--predictions", str(tmp_path / "maps"), "--manifest", str(manifest),
                 "--split", "test", "--risk", "fnr", "--alpha", "0.1", "--output", str(tmp_path / "conf"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and f"{manifest}: label 'ignore' = 2: conformal fit does not support" in err
    assert not (tmp_path / "conf" / "conformal.json").exists()


def test_auto_selection_scores_the_kept_voxels_only(tmp_path: Path) -> None:
    """``auto``'s cross-validation (two cases, two folds): the uncalibrated held-out NLL of each fold is
    the case's softmax NLL over its kept voxels, float64 by hand."""
    rng = np.random.default_rng(0)
    volumes, hand = {}, {}
    for case_id in ("a", "b"):
        label = rng.integers(0, 3, size=(6, 5, 4)).astype(np.uint8)
        logits = rng.normal(0, 2, size=(6, 5, 4, 2)).astype(np.float32)
        logits[label == 2, 1] += 8.0  # would change the NLL if the ignored voxels counted
        volumes[case_id] = label
        write_nifti(tmp_path / "maps" / f"{case_id}_logits.nii.gz", logits, LPS_ANISO)
        z, y = logits[label != 2].astype(np.float64), label[label != 2].astype(np.int64)
        log_p = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
        hand[case_id] = float(-log_p[np.arange(y.size), y].mean())
    manifest = _dataset(tmp_path / "data", LABELS, volumes)
    record = fit_on_predictions(tmp_path / "maps", manifest, tmp_path / "cal",
                                FitOptions(method="auto", split="test", folds=2, device="cpu"))
    nll = record["selection"]["uncalibrated"]["nll"]
    assert sorted(nll["folds"]) == pytest.approx(sorted(hand.values()), abs=1e-6)
