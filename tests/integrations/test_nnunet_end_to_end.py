"""nnU-Net v2 end to end on CPU, with nnU-Net's own commands and the embedded hippocampus data:
``nnUNetv2_plan_and_preprocess`` -> ``nnUNetv2_train -tr <segcalib MbLS trainer> -device cpu --npz``
(fold 0) -> ``segcalib calibrate fit`` on the trainer folder -> ``nnUNetv2_predict --save_probabilities``
(through ``nnUNet_extTrainer``; without it, nnU-Net's error names the variable and the training log
holds the line to set) -> ``segcalib calibrate apply`` -> ``segcalib evaluate``, checked against
numpy on the written maps.

Kept small: 5 training cases (nnU-Net's 5 folds need 5), 2 test cases, the plans' feature counts
divided by 4 (nnU-Net's patch, batch, stages and deep supervision unchanged), one epoch of two
iterations without mirroring (``nnunet_ext/segcalib_test_trainers.py``). About 2 min on 2 quiet
cores, most of it nnU-Net's process starts; the limit is set for a machine shared with other jobs."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import segcalib
from segcalib.cli import main

pytest.importorskip("nnunetv2")

REPO = Path(segcalib.__file__).resolve().parents[1]
TEST_TRAINERS = Path(__file__).resolve().parent / "nnunet_ext"
DATASET_ID, DATASET = 904, "Dataset904_HippocampusTiny"
CONFIG, TRAINER = "3d_fullres", "nnUNetTrainerSegcalibMbLS_Tiny"
LABELS = {"background": 0, "Anterior": 1, "Posterior": 2}


def write_raw_dataset(raw: Path) -> tuple[list[str], list[str]]:
    """The smoke manifest's training + validation cases as ``imagesTr``/``labelsTr``, its test case and
    the demo's first test case as ``imagesTs``/``labelsTs``, and nnU-Net v2's ``dataset.json``."""
    manifests = REPO / "data_manifests"
    smoke = json.loads((manifests / "hippocampus_smoke.json").read_text())
    demo = json.loads((manifests / "hippocampus_demo.json").read_text())
    ids: dict[str, list[str]] = {"Tr": [], "Ts": []}
    for kind, items in (("Tr", smoke["training"] + smoke["validation"]), ("Ts", smoke["test"] + demo["test"][:1])):
        (raw / f"images{kind}").mkdir(parents=True, exist_ok=True)
        (raw / f"labels{kind}").mkdir(parents=True, exist_ok=True)
        for item in items:
            image = (manifests / item["image"]).resolve()
            case = image.name.removesuffix(".nii.gz")
            shutil.copyfile(image, raw / f"images{kind}" / f"{case}_0000.nii.gz")
            shutil.copyfile((manifests / item["label"]).resolve(), raw / f"labels{kind}" / f"{case}.nii.gz")
            ids[kind].append(case)
    dataset = {"channel_names": {"0": "MRI"}, "labels": LABELS, "numTraining": len(ids["Tr"]), "file_ending": ".nii.gz"}
    (raw / "dataset.json").write_text(json.dumps(dataset))
    return ids["Tr"], ids["Ts"]


def nnunet_env(root: Path, ext_trainer: str | None) -> dict[str, str]:
    """The subprocesses' environment: nnU-Net's folders under ``root``, work in one process (2 cores),
    this checkout's segcalib first on the path, ``nnUNet_extTrainer`` only when given."""
    env = {k: v for k, v in os.environ.items() if k not in ("nnUNet_extTrainer", "SEGCALIB_LOSS", "SEGCALIB_LOSS_PARAMS")}
    env.update(nnUNet_raw=str(root / "nnUNet_raw"), nnUNet_preprocessed=str(root / "nnUNet_preprocessed"),
               nnUNet_results=str(root / "nnUNet_results"), nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1",
               nnUNet_compile="0", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if ext_trainer is not None:
        env["nnUNet_extTrainer"] = ext_trainer
    return env


def nnunet(command: str, *args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    """nnU-Net's console command (``nnUNetv2_train`` ...) from this interpreter's environment."""
    script = Path(sys.executable).parent / command
    if not script.is_file():
        found = shutil.which(command)
        if found is None:
            pytest.skip(f"{command} is not installed beside {sys.executable}")
        script = Path(found)
    # own process group: nnU-Net's worker processes end with it, even when the test is stopped
    process = subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=900)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    if check and done.returncode != 0:
        pytest.fail(f"{command} {' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def shrink_plans(plans_file: Path) -> None:
    """A quarter of the planned features per stage, so that CPU training takes seconds; everything
    else (patch, batch, stages, strides, deep supervision) as nnU-Net planned it."""
    plans = json.loads(plans_file.read_text())
    arch = plans["configurations"][CONFIG]["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [max(4, f // 4) for f in arch["features_per_stage"]]
    plans_file.write_text(json.dumps(plans, indent=1))


def fold_manifest(path: Path, raw: Path, cases: list[str]) -> Path:
    """A segcalib manifest whose training list is ``cases`` (fold 0's held-out cases) in ``raw``."""
    entries = [{"image": f"{raw}/imagesTr/{c}_0000.nii.gz", "label": f"{raw}/labelsTr/{c}.nii.gz", "case_id": c}
               for c in cases]
    labels = {str(v): k for k, v in LABELS.items()}
    path.write_text(json.dumps({"labels": labels, "training": entries, "validation": [], "test": []}))
    return path


def summary(report_dir: Path) -> dict:
    return json.loads((report_dir / "report.json").read_text())


def by_hand(folder: Path, labels_dir: Path, cases: list[str]) -> dict[str, float]:
    """Pooled NLL and foreground Dice (per case and class 1, 2 on the argmax, first maximum on ties;
    mean over cases and classes) from the ``<case>_probs`` maps as nibabel reads them (class last)
    against the label files, float64."""
    nll, voxels, dice = 0.0, 0, []
    for case in cases:
        probs = np.asarray(nib.load(str(folder / f"{case}_probs.nii.gz")).get_fdata(), dtype=np.float64)
        label = np.asarray(nib.load(str(labels_dir / f"{case}.nii.gz")).dataobj).astype(np.int64)
        assert probs.shape == (*label.shape, 3)
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-3)
        p_true = np.take_along_axis(probs, label[..., None], -1)[..., 0]
        nll -= np.log(np.maximum(p_true, 1e-12)).sum()
        voxels += label.size
        pred = probs.argmax(-1)
        dice += [2 * ((pred == k) & (label == k)).sum() / ((pred == k).sum() + (label == k).sum()) for k in (1, 2)]
    return {"nll": nll / voxels, "dice_fg": float(np.mean(dice))}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_nnunet_train_calibrate_predict_evaluate(tmp_path: Path) -> None:
    from segcalib.integrations.nnunet import trainer_folder
    from segcalib.integrations.nnunet.trainers import _load_plain

    raw = tmp_path / "nnUNet_raw" / DATASET
    train_ids, test_ids = write_raw_dataset(raw)
    ext = os.pathsep.join([str(trainer_folder()), str(TEST_TRAINERS)])

    # 1. plan and preprocess (nnU-Net's planner sets torch's threads from nnUNet_n_proc_DA: 1 there)
    plan_env = {**nnunet_env(tmp_path, None), "nnUNet_n_proc_DA": "1"}
    nnunet("nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", CONFIG, "-np", "1", "-npfp", "1",
           "--verify_dataset_integrity", env=plan_env)
    preprocessed = tmp_path / "nnUNet_preprocessed" / DATASET
    shrink_plans(preprocessed / "nnUNetPlans.json")

    # 2. train fold 0 with segcalib's MbLS trainer (a test subclass), --npz keeps the validation maps
    nnunet("nnUNetv2_train", str(DATASET_ID), CONFIG, "0", "-tr", TRAINER, "-device", "cpu", "--npz",
           env=nnunet_env(tmp_path, ext))
    trainer_dir = tmp_path / "nnUNet_results" / DATASET / f"{TRAINER}__nnUNetPlans__{CONFIG}"
    fold = trainer_dir / "fold_0"
    held_out = json.loads((preprocessed / "splits_final.json").read_text())[0]["val"]
    assert set(held_out) < set(train_ids)
    for case in held_out:
        assert (fold / "validation" / f"{case}.npz").is_file() and (fold / "validation" / f"{case}.nii.gz").is_file()
    checkpoint = _load_plain(str(fold / "checkpoint_final.pth"), "checkpoint_final.pth")
    assert checkpoint["trainer_name"] == TRAINER and checkpoint["current_epoch"] == 1
    assert checkpoint["segcalib_loss"]["name"] == "mbls"
    log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "segcalib loss 'mbls' with margin=10.0, alpha=0.1, ignore_index=-100 (from nnUNetTrainerSegcalibMbLS_Tiny)" in log
    export_line = re.search(r"export nnUNet_extTrainer=(.+)$", log, re.MULTILINE)
    assert export_line is not None and shlex.split(export_line.group(1)) == [ext]

    # 3. temperature fitted on the fold's held-out maps, read from the trainer folder itself
    manifest_fold = fold_manifest(tmp_path / "fold0_manifest.json", raw, held_out)
    cal = tmp_path / "cal"
    assert main(["calibrate", "fit", "--predictions", str(trainer_dir), "--manifest", str(manifest_fold), "--split",
                 "training", "--method", "temperature", "--output", str(cal), "--device", "cpu"]) == 0
    record = json.loads((cal / "calibrator.json").read_text())
    assert sorted(record["cases"]) == sorted(held_out) and record["prediction_format"] == "nnunet"
    temperature = record["params"]["temperature"]
    assert np.isfinite(temperature) and temperature > 0
    assert main(["calibrate", "apply", "--calibrator", str(cal), "--predictions", str(trainer_dir),
                 "--output", str(tmp_path / "val_cal"), "--device", "cpu"]) == 0
    for folder, out in ((trainer_dir, "val_raw"), (tmp_path / "val_cal", "val_cal_report")):
        assert main(["evaluate", "--predictions", str(folder), "--manifest", str(manifest_fold), "--split", "training",
                     "--output", str(tmp_path / out), "--no-uncertainty", "--device", "cpu"]) == 0
    nll_raw = summary(tmp_path / "val_raw")["summary"]["nll"]
    nll_cal = summary(tmp_path / "val_cal_report")["summary"]["nll"]
    # fitted on these very voxels, T = 1 among the candidates: never worse (up to the maps' storage rounding)
    assert nll_cal <= nll_raw + 1e-4, (temperature, nll_raw, nll_cal)

    # 4. nnUNetv2_predict needs nnUNet_extTrainer: without it nnU-Net's error names the variable ...
    predict = ["-i", str(raw / "imagesTs"), "-d", str(DATASET_ID), "-c", CONFIG, "-f", "0", "-tr", TRAINER,
               "--save_probabilities", "-device", "cpu", "-npp", "1", "-nps", "1"]
    failed = nnunet("nnUNetv2_predict", "-o", str(tmp_path / "pred_none"), *predict,
                    env=nnunet_env(tmp_path, None), check=False)
    assert failed.returncode != 0
    assert TRAINER in failed.stderr and "nnUNet_extTrainer" in failed.stderr
    assert not list((tmp_path / "pred_none").glob("*.npz"))
    # ... and with the value the training log prints, plain nnU-Net inference runs the segcalib trainer's model
    nnunet("nnUNetv2_predict", "-o", str(tmp_path / "pred"), *predict,
           env=nnunet_env(tmp_path, shlex.split(export_line.group(1))[0]))
    for case in test_ids:
        assert (tmp_path / "pred" / f"{case}.npz").is_file()

    # 5. calibrate the test maps, evaluate them; the report's numbers against numpy on the written maps
    assert main(["calibrate", "apply", "--calibrator", str(cal), "--predictions", str(tmp_path / "pred"),
                 "--output", str(tmp_path / "test_cal"), "--device", "cpu"]) == 0
    assert main(["evaluate", "--predictions", str(tmp_path / "test_cal"), "--manifest", str(raw / "dataset.json"),
                 "--split", "test", "--output", str(tmp_path / "report"), "--device", "cpu"]) == 0
    report = summary(tmp_path / "report")
    assert report["counts"]["cases"] == len(test_ids)
    numbers = [v for v in report["summary"].values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    assert len(numbers) > 5 and all(np.isfinite(numbers))
    hand = by_hand(tmp_path / "test_cal", raw / "labelsTs", test_ids)
    assert report["summary"]["nll"] == pytest.approx(hand["nll"], rel=1e-5)
    assert report["summary"]["dice_fg"] == pytest.approx(hand["dice_fg"], abs=1e-6)
