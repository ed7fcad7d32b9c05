"""An nnU-Net trainer output folder read as the union of its folds' validation maps (out-of-fold maps of
every training case), as ``nnUNetv2_train ... --npz`` leaves it, and ``calibrate fit`` on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from segcalib.cli import main
from segcalib.errors import DataError
from segcalib.predictions import open_predictions
from tests.predictions.nnunet_folders import LABELS, blob_label_zyx, nnunet_logits, softmax, write_like_nnunet, write_sitk


def _trainer_folder(root: Path, folds: dict[int, list[str]]) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """``root/data`` (images, labels, dataset.json listing every case as training) and
    ``root/results/Dataset001_Test/nnUNetTrainer__nnUNetPlans__3d_fullres/fold_k/validation``."""
    trainer = root / "results" / "Dataset001_Test" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    probs, entries = {}, []
    for fold, cases in folds.items():
        for i, case_id in enumerate(cases):
            label_zyx = blob_label_zyx(seed=fold * 10 + i)
            image = write_sitk(root / "data" / "imagesTr" / f"{case_id}_0000.nii.gz", label_zyx.astype(np.float32))
            write_sitk(root / "data" / "labelsTr" / f"{case_id}.nii.gz", label_zyx)
            probs[case_id] = softmax(nnunet_logits(label_zyx, seed=i) / 2)  # under-confident: T < 1 should win
            write_like_nnunet(trainer / f"fold_{fold}" / "validation", case_id, probs[case_id], image)
            entries.append({"image": f"imagesTr/{case_id}_0000.nii.gz", "label": f"labelsTr/{case_id}.nii.gz",
                            "case_id": case_id})
    (trainer / "fold_all" / "validation").mkdir(parents=True)  # no held-out case there: never read
    (trainer / "dataset.json").write_text(json.dumps({"labels": LABELS, "file_ending": ".nii.gz"}))
    (trainer / "plans.json").write_text("{}")
    manifest = root / "data" / "dataset.json"
    manifest.write_text(json.dumps({"labels": {str(v): k for k, v in LABELS.items()}, "training": entries,
                                    "validation": [], "test": []}))
    return trainer, manifest, probs


def test_trainer_folder_is_the_union_of_its_folds(tmp_path: Path) -> None:
    trainer, _, probs = _trainer_folder(tmp_path, {0: ["c_01", "c_02"], 1: ["c_03"], 2: ["c_04", "c_05"]})
    folder = open_predictions(trainer)
    assert folder.format == "nnunet" and folder.case_ids() == sorted(probs)
    assert [Path(f).parent.name for f in folder.metadata["folds"]] == ["fold_0", "fold_1", "fold_2"]
    assert folder.path_of("c_03")[0] == trainer / "fold_1" / "validation" / "c_03.npz"
    values = folder.read("c_04").values  # nnU-Net's (C, z, y, x) read onto the label's (x, y, z) voxels
    np.testing.assert_allclose(values, probs["c_04"].transpose(0, 3, 2, 1), atol=1e-6)


def test_a_case_in_two_folds_and_a_fold_without_npz_are_named(tmp_path: Path) -> None:
    trainer, _, _ = _trainer_folder(tmp_path / "a", {0: ["c_01"], 1: ["c_01"]})
    with pytest.raises(DataError, match=r"c_01.*fold_0.*fold_1|c_01.*fold_1.*fold_0"):
        open_predictions(trainer)
    trainer, _, _ = _trainer_folder(tmp_path / "b", {0: ["c_01"]})
    (trainer / "fold_1" / "validation").mkdir(parents=True)
    (trainer / "fold_1" / "validation" / "c_09.nii.gz").write_bytes(b"")  # trained without --npz
    with pytest.raises(DataError, match="--npz"):
        open_predictions(trainer)


def test_calibrate_fit_on_the_folds_uses_every_out_of_fold_case(tmp_path: Path) -> None:
    trainer, manifest, probs = _trainer_folder(tmp_path, {0: ["c_01", "c_02"], 1: ["c_03", "c_04"]})
    assert main(["calibrate", "fit", "--predictions", str(trainer), "--manifest", str(manifest), "--split",
                 "training", "--method", "temperature", "--output", str(tmp_path / "cal")]) == 0
    record = json.loads((tmp_path / "cal" / "calibrator.json").read_text())
    assert sorted(record["cases"]) == sorted(probs) and record["prediction_format"] == "nnunet"
    assert record["params"]["temperature"] < 1  # the maps were made twice too soft


def test_auto_keeps_each_nnunet_folds_cases_in_one_cross_validation_fold(tmp_path: Path) -> None:
    folds = {0: ["c_01", "c_02"], 1: ["c_03", "c_04"], 2: ["c_05", "c_06"]}
    trainer, manifest, _ = _trainer_folder(tmp_path, folds)
    assert main(["calibrate", "fit", "--predictions", str(trainer), "--manifest", str(manifest), "--split",
                 "training", "--method", "auto", "--folds", "3", "--quiet", "--output", str(tmp_path / "cal")]) == 0
    assigned = json.loads((tmp_path / "cal" / "calibrator.json").read_text())["selection"]["folds"]
    for cases in folds.values():  # one model's held-out maps are never split between fitting and scoring
        assert len({assigned[c] for c in cases}) == 1
    assert len(set(assigned.values())) == 3


def test_fit_on_a_trainer_folder_takes_every_fold_case_whatever_segcalib_split_it_into(tmp_path: Path, caplog) -> None:
    # nnU-Net's raw dataset.json lists no validation cases: segcalib makes a seeded validation split (and
    # a test split) out of the training cases, but nnU-Net trained on all of them and each fold map is out of fold
    folds = {0: ["c_01", "c_02", "c_03"], 1: ["c_04", "c_05", "c_06"], 2: ["c_07", "c_08", "c_09"]}
    trainer, manifest, probs = _trainer_folder(tmp_path, folds)
    raw = json.loads(manifest.read_text())
    entries = raw["training"] + [{"image": raw["training"][0]["image"], "label": raw["training"][0]["label"],
                                  "case_id": "c_10"}]  # labelled, but in no trained fold
    manifest.write_text(json.dumps({"labels": raw["labels"], "training": entries}))
    from segcalib.data import load_manifest

    loaded = load_manifest(manifest)
    assert loaded.cases("validation") and loaded.generated_splits  # the split segcalib made
    with caplog.at_level("WARNING", logger="segcalib"):
        assert main(["calibrate", "fit", "--predictions", str(trainer), "--manifest", str(manifest),
                     "--method", "temperature", "--output", str(tmp_path / "cal")]) == 0
    record = json.loads((tmp_path / "cal" / "calibrator.json").read_text())
    assert record["split"] == "folds" and sorted(record["cases"]) == sorted(probs)
    assert "1 of the manifest's 10 labelled case(s) have no fold validation map" in caplog.text and "c_10" in caplog.text
    # an explicit split still means that split alone
    assert main(["calibrate", "fit", "--predictions", str(trainer), "--manifest", str(manifest), "--split", "validation",
                 "--method", "temperature", "--output", str(tmp_path / "cal_val")]) == 0
    record = json.loads((tmp_path / "cal_val" / "calibrator.json").read_text())
    assert sorted(record["cases"]) == sorted(c.case_id for c in loaded.labelled("validation"))


def test_split_folds_needs_a_trainer_folder(tmp_path: Path) -> None:
    trainer, manifest, _ = _trainer_folder(tmp_path, {0: ["c_01", "c_02"]})
    plain = trainer / "fold_0" / "validation"
    assert main(["calibrate", "fit", "--predictions", str(plain), "--manifest", str(manifest), "--split", "folds",
                 "--method", "temperature", "--output", str(tmp_path / "cal")]) == 2
    assert not (tmp_path / "cal").exists()


def test_auto_on_a_trainer_folder_with_one_fold_trained_splits_its_cases(tmp_path: Path) -> None:
    # one trained fold is one model: nothing to keep together, its cases are cross-validated one by one
    trainer, manifest, probs = _trainer_folder(tmp_path, {0: ["c_01", "c_02", "c_03", "c_04"]})
    assert main(["calibrate", "fit", "--predictions", str(trainer), "--manifest", str(manifest), "--method", "auto",
                 "--folds", "2", "--quiet", "--output", str(tmp_path / "cal")]) == 0
    assigned = json.loads((tmp_path / "cal" / "calibrator.json").read_text())["selection"]["folds"]
    assert sorted(assigned) == sorted(probs) and len(set(assigned.values())) == 2
