"""What evaluate and report are given: JSON that is not a report, export records that are not
objects (exit 2 naming the file), and an export evaluated against another manifest (a warning
naming both)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segcalib.cli import main
from segcalib.data import load_manifest
from segcalib.reports import evaluate, read_report
from tests.synthetic import make_dataset, write_nifti


@pytest.fixture
def exported(tmp_path: Path) -> tuple[Path, Path]:
    """A manifest and perfect maps of its test case, with an export.json that records it."""
    manifest = make_dataset(tmp_path / "data", 2, (10, 10, 6), None, {"training": 1, "test": 1})
    case = load_manifest(manifest).cases("test")[0]
    label = np.asarray(nib.load(str(case.label)).dataobj).astype(np.int64)
    pred = tmp_path / "pred"
    write_nifti(pred / f"{case.case_id}_probs.nii.gz", np.eye(3, dtype=np.float32)[label])
    record = {"status": "complete", "manifest": str(manifest.resolve()), "split": "test", "temperature": 1.0,
              "temperature_request": {"mode": "none"}, "checkpoint": "/x/best.pt"}
    (pred / "export.json").write_text(json.dumps(record))
    return manifest, pred


def test_evaluating_against_another_manifest_warns_naming_both(exported, tmp_path: Path, caplog) -> None:
    manifest, pred = exported
    other = tmp_path / "copy"
    shutil.copytree(manifest.parent, other)  # same case ids, another manifest
    with caplog.at_level(logging.WARNING, logger="segcalib"):
        report = evaluate(pred, manifest, tmp_path / "same", write_html=False)
    assert not [r for r in caplog.records if "exported from the manifest" in r.getMessage()]
    assert report["summary"]["dice_fg"] == 1.0
    with caplog.at_level(logging.WARNING, logger="segcalib"):
        evaluate(pred, other / "dataset.json", tmp_path / "other", write_html=False)
    (warning,) = [r.getMessage() for r in caplog.records if "exported from the manifest" in r.getMessage()]
    assert str(manifest.resolve()) in warning and str((other / "dataset.json").resolve()) in warning


@pytest.mark.parametrize("content", ["export", "{}", "[]", "folder", "partial"])
def test_report_on_something_that_is_not_a_report_exits_2_naming_it(exported, tmp_path: Path, capsys, content) -> None:
    _, pred = exported
    path = tmp_path / "input.json"
    if content == "export":
        path = pred / "export.json"
    elif content == "folder":
        path = tmp_path / "in" / "report.json"
        path.mkdir(parents=True)  # found by the folder search, but a folder
    elif content == "partial":
        path.write_text(json.dumps({"metadata": {"n_bins": 15}, "calibration": {"all": {}}}))
    else:
        path.write_text(content)
    given = path.parent if content == "folder" else path
    assert main(["report", str(given), "--output", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert f"segcalib: error: {path}:" in err and "Traceback" not in err
    expected = {"export": "not a segcalib evaluation report (it is an export record", "{}": "no 'metadata'",
                "[]": "a JSON list, not an object", "folder": "is a folder", "partial": "no 'calibration'"}[content]
    assert expected in err
    assert not (tmp_path / "cmp").exists()


def test_a_real_report_still_reads(exported, tmp_path: Path) -> None:
    manifest, pred = exported
    evaluate(pred, manifest, tmp_path / "r", write_html=False)
    assert read_report(tmp_path / "r" / "report.json")["summary"]["dice_fg"] == 1.0


@pytest.mark.parametrize("kind, expected", [("list", "not an export record (a JSON list"), ("folder", "is not a file")])
def test_export_json_that_is_a_list_or_a_folder_exits_2(exported, tmp_path: Path, capsys, kind, expected) -> None:
    manifest, pred = exported
    record = pred / "export.json"
    record.unlink()
    if kind == "list":
        record.write_text("[1, 2]")
    else:
        record.mkdir()
    code = main(["evaluate", "--predictions", str(pred), "--manifest", str(manifest), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and f"{record}: " in err and expected in err and "Traceback" not in err
