"""``segcalib calibrate fit`` / ``apply`` on exported maps, and ensembles at export, end to end on
the smoke run: values checked against an independent recomputation from the written files."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from segcalib.calibrators import load_calibrator
from segcalib.cli import main
from segcalib.config import load_config
from segcalib.data import load_manifest, read_volume
from segcalib.export import ExportOptions, export
from segcalib.export.posthoc import FitOptions, apply_to_predictions, fit_on_predictions
from segcalib.reports import evaluate


def _manifest(smoke_run: Path) -> Path:
    return Path(load_config(smoke_run / "config.yaml").data.manifest)


@pytest.fixture(scope="module")
def logits_export(smoke_run: Path, tmp_path_factory) -> Path:
    """Training, validation and test maps of the smoke run, with their logits."""
    root = tmp_path_factory.mktemp("posthoc")
    for split in ("training", "validation", "test"):
        export(smoke_run, _manifest(smoke_run), root / split, ExportOptions(split=split, logits=True, progress=False))
    return root


def _nll(probs: np.ndarray, label: np.ndarray) -> float:
    """Mean -log p_y, float64, from a (*S, C) map and a (*S) label."""
    p_true = np.take_along_axis(probs.astype(np.float64), label[..., None], axis=-1)[..., 0]
    return float(-np.log(np.clip(p_true, 1e-12, None)).mean())


def test_fit_then_apply_a_temperature_equals_softmax_of_logits_over_t(smoke_run: Path, logits_export: Path, tmp_path: Path) -> None:
    manifest = _manifest(smoke_run)
    record = fit_on_predictions(logits_export / "validation", manifest, tmp_path / "cal",
                                FitOptions(method="temperature", region="foreground"))
    t = record["params"]["temperature"]
    assert record["method"] == "temperature" and record["fit_region"] == "foreground" and t > 0
    out = apply_to_predictions(tmp_path / "cal", logits_export / "test", tmp_path / "calibrated", progress=False)
    assert out["status"] == "complete" and out["calibrator"]["method"] == "temperature"
    (case,) = load_manifest(manifest).cases("test")
    logits = nib.load(str(logits_export / "test" / f"{case.case_id}_logits.nii.gz")).get_fdata().astype(np.float64)
    expected = torch.softmax(torch.from_numpy(logits) / t, dim=-1).numpy()  # independent: from the written logits
    got = nib.load(str(tmp_path / "calibrated" / f"{case.case_id}_probs.nii.gz")).get_fdata()
    np.testing.assert_allclose(got, expected, atol=2e-5)
    seg = np.asarray(nib.load(str(tmp_path / "calibrated" / f"{case.case_id}_seg.nii.gz")).dataobj)
    assert np.array_equal(seg, expected.argmax(-1))  # temperature keeps the argmax
    # the calibrated folder is an export: evaluate reads it unchanged and reports the calibrator's T
    report = evaluate(tmp_path / "calibrated", manifest, tmp_path / "report", split="test", write_html=False)
    assert report["metadata"]["temperature"] == pytest.approx(t)


def test_fit_lowers_validation_nll_and_a_rerun_of_apply_leaves_the_folder(smoke_run: Path, logits_export: Path, tmp_path: Path) -> None:
    manifest = _manifest(smoke_run)
    fit_on_predictions(logits_export / "validation", manifest, tmp_path / "cal", FitOptions(method="vector"))
    apply_to_predictions(tmp_path / "cal", logits_export / "validation", tmp_path / "val_cal", progress=False)
    before = after = 0.0
    for case in load_manifest(manifest).labelled("validation"):
        label = read_volume(case.label, dtype=np.int64)[0]
        before += _nll(nib.load(str(logits_export / "validation" / f"{case.case_id}_probs.nii.gz")).get_fdata(), label)
        after += _nll(nib.load(str(tmp_path / "val_cal" / f"{case.case_id}_probs.nii.gz")).get_fdata(), label)
    assert after < before  # fitted by NLL on these very voxels
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "val_cal").iterdir() if p.suffix == ".gz"}
    apply_to_predictions(tmp_path / "cal", logits_export / "validation", tmp_path / "val_cal", progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "val_cal").iterdir() if p.suffix == ".gz"} == stamps


def test_calibrate_cli_auto_chooses_by_cross_validation_and_refuses_bad_input(smoke_run: Path, logits_export: Path, tmp_path: Path, capsys) -> None:
    manifest = str(_manifest(smoke_run))
    code = main(["calibrate", "fit", "--predictions", str(logits_export / "training"), "--manifest", manifest,
                 "--split", "training", "--method", "auto", "--folds", "2", "--output", str(tmp_path / "auto")])
    assert code == 0
    record = json.loads((tmp_path / "auto" / "calibrator.json").read_text())
    table = record["selection"]["cv_table"]
    assert record["method"] == record["selection"]["selected"] and record["method"] in table
    winner = record["method"]
    raw = record["selection"]["uncalibrated"]
    metrics = ("nll", "ece_all", "ece_foreground", "ece_boundary")
    ratios = {n: [r[m]["mean"] / raw[m]["mean"] for m in metrics] for n, r in table.items() if "error" not in r}
    scores = {n: sum(v) / 4 for n, v in ratios.items()}  # the default criterion, balanced, by hand
    admissible = [n for n, v in ratios.items() if max(v) <= 1] or list(ratios)
    assert record["selection"]["criterion"] == "balanced"
    assert scores[winner] == pytest.approx(min(scores[n] for n in admissible), rel=1e-12)
    assert all("seconds" in row for row in table.values())
    shown = capsys.readouterr().out
    assert "uncalibrated" in shown and f"{winner} *" in shown  # the CV table is printed
    assert load_calibrator(tmp_path / "auto").name == winner
    # exit 2, one message naming the thing: a folder that is not a calibrator, an unknown method
    assert main(["calibrate", "apply", "--calibrator", str(tmp_path), "--predictions",
                 str(logits_export / "test"), "--output", str(tmp_path / "x")]) == 2
    assert "calibrator.json" in capsys.readouterr().err
    assert main(["calibrate", "fit", "--predictions", str(logits_export / "validation"), "--manifest", manifest,
                 "--method", "nope", "--output", str(tmp_path / "y")]) == 2


def test_ensemble_of_a_run_with_itself_equals_the_run(smoke_run: Path, tmp_path: Path) -> None:
    manifest = _manifest(smoke_run)
    export(smoke_run, manifest, tmp_path / "one", ExportOptions(progress=False))
    export([smoke_run, smoke_run], manifest, tmp_path / "two", ExportOptions(progress=False, variance=True))
    (case,) = load_manifest(manifest).cases("test")
    one = nib.load(str(tmp_path / "one" / f"{case.case_id}_probs.nii.gz")).get_fdata()
    two = nib.load(str(tmp_path / "two" / f"{case.case_id}_probs.nii.gz")).get_fdata()
    np.testing.assert_allclose(two, one, atol=1e-6)
    maps = {n: nib.load(str(tmp_path / "two" / f"{case.case_id}_{n}.nii.gz")).get_fdata()
            for n in ("entropy", "mutual_info", "expected_entropy", "variance")}
    np.testing.assert_allclose(maps["entropy"], maps["expected_entropy"] + maps["mutual_info"], atol=1e-6)
    assert np.abs(maps["mutual_info"]).max() < 1e-5 and np.abs(maps["variance"]).max() < 1e-6
    expected_entropy = -(one * np.log(np.clip(one, 1e-12, None))).sum(-1)  # from the single run's map
    np.testing.assert_allclose(maps["entropy"], expected_entropy, atol=1e-5)
    record = json.loads((tmp_path / "two" / "export.json").read_text())
    assert len(record["members"]) == 2 and record["combination"]["predictions_per_case"] == 2


def test_tta_flips_average_members_and_mc_dropout_is_refused_without_dropout(smoke_run: Path, tmp_path: Path) -> None:
    manifest = _manifest(smoke_run)
    export(smoke_run, manifest, tmp_path / "tta", ExportOptions(progress=False, tta=[0]))
    (case,) = load_manifest(manifest).cases("test")
    probs = nib.load(str(tmp_path / "tta" / f"{case.case_id}_probs.nii.gz")).get_fdata()
    assert np.abs(probs.sum(-1) - 1).max() < 1e-5
    mi = nib.load(str(tmp_path / "tta" / f"{case.case_id}_mutual_info.nii.gz")).get_fdata()
    assert mi.min() >= 0 and mi.max() > 0  # two flips of a network that is not flip-equivariant disagree
    assert main(["export", "--run", str(smoke_run), "--manifest", str(manifest), "--output", str(tmp_path / "mc"),
                 "--mc-dropout", "4"]) == 2
