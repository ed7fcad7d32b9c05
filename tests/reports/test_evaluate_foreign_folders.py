"""``segcalib evaluate`` on another model's folder as it is: an nnU-Net v2 ``--save_probabilities`` folder
written by nnunetv2's own exporter, and 4D NIfTI logits -- NLL, Brier, ECE and Dice computed by hand
from the probabilities nnU-Net writes."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segcalib.cli import main
from tests.predictions.nnunet_folders import LABELS, blob_label_zyx, export_with_nnunetv2, nnunet_logits, write_sitk


def _by_hand(probs: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """Pooled NLL, Brier, top-label ECE (15 bins, SPEC binning) and per-class Dice, float64."""
    p = probs.reshape(probs.shape[0], -1).astype(np.float64)
    y = label.reshape(-1)
    p_y = p[y, np.arange(y.size)]
    onehot = np.eye(p.shape[0])[y].T
    conf, pred = p.max(0), p.argmax(0)
    bins = np.clip(np.ceil(conf * 15) - 1, 0, 14).astype(int)
    ece = sum(abs((pred == y)[bins == b].sum() - conf[bins == b].sum()) for b in range(15)) / y.size
    dice = [2 * ((pred == k) & (y == k)).sum() / ((pred == k).sum() + (y == k).sum()) for k in (1, 2)]
    return {"nll": float(-np.log(np.maximum(p_y, 1e-12)).mean()), "brier": float(((p - onehot) ** 2).sum(0).mean()),
            "ece_all": float(ece), "dice_fg": float(np.mean(dice))}


def _dataset(root: Path, n: int = 2) -> tuple[Path, list[tuple[str, Path, np.ndarray]]]:
    cases, entries = [], []
    for i in range(n):
        case_id = f"liver_{i:03d}"
        label_zyx = blob_label_zyx(seed=i)
        image = write_sitk(root / "imagesTs" / f"{case_id}_0000.nii.gz", label_zyx.astype(np.float32) * 10)
        write_sitk(root / "labelsTs" / f"{case_id}.nii.gz", label_zyx)
        cases.append((case_id, image, label_zyx))
        entries.append({"image": f"imagesTs/{case_id}_0000.nii.gz", "label": f"labelsTs/{case_id}.nii.gz",
                        "case_id": case_id})
    manifest = root / "dataset.json"
    manifest.write_text(json.dumps({"labels": {str(v): k for k, v in LABELS.items()}, "test": entries}))
    return manifest, cases


def test_evaluate_reads_an_nnunet_folder_as_it_is(tmp_path: Path) -> None:
    pytest.importorskip("nnunetv2")
    manifest, cases = _dataset(tmp_path / "data")
    probs, labels = [], []
    for case_id, image, label_zyx in cases:
        expected = export_with_nnunetv2(tmp_path / "nnunet", case_id, image, nnunet_logits(label_zyx, seed=3))
        probs.append(expected.reshape(3, -1))  # what nnU-Net writes, (C, z, y, x) order flattened
        labels.append(label_zyx.reshape(-1))
    assert main(["evaluate", "--predictions", str(tmp_path / "nnunet"), "--manifest", str(manifest),
                 "--split", "test", "--output", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    hand = _by_hand(np.concatenate(probs, 1), np.concatenate(labels))
    s = report["summary"]
    assert report["metadata"]["prediction_format"] == "nnunet"
    # nnU-Net stores float32 probabilities: pooled values agree to float32 rounding
    assert [s["nll"], s["brier"], s["ece_all"]] == pytest.approx([hand["nll"], hand["brier"], hand["ece_all"]], rel=1e-5)
    assert report["counts"]["cases"] == 2


def test_evaluate_reads_4d_nifti_logits_class_first(tmp_path: Path) -> None:
    manifest, cases = _dataset(tmp_path / "data")
    out = tmp_path / "nifti"
    out.mkdir()
    probs, labels = [], []
    for case_id, _, label_zyx in cases:
        label_img = nib.load(str(tmp_path / "data" / "labelsTs" / f"{case_id}.nii.gz"))
        label_xyz = np.asarray(label_img.dataobj).astype(np.int64)
        logits = nnunet_logits(label_zyx, seed=5).transpose(0, 3, 2, 1)  # (C, x, y, z): the label's voxel order
        nib.save(nib.Nifti1Image(np.ascontiguousarray(logits), label_img.affine), str(out / f"{case_id}.nii.gz"))
        z = logits.astype(np.float64)
        e = np.exp(z - z.max(0, keepdims=True))
        probs.append((e / e.sum(0, keepdims=True)).reshape(3, -1))
        labels.append(label_xyz.reshape(-1))
    assert main(["evaluate", "--predictions", str(out), "--manifest", str(manifest), "--split", "test",
                 "--channel-axis", "first", "--output", str(tmp_path / "report"), "--no-uncertainty"]) == 0
    s = json.loads((tmp_path / "report" / "report.json").read_text())["summary"]
    hand = _by_hand(np.concatenate(probs, 1), np.concatenate(labels))
    assert [s["nll"], s["brier"], s["ece_all"], s["dice_fg"]] == pytest.approx(
        [hand["nll"], hand["brier"], hand["ece_all"], hand["dice_fg"]], rel=1e-5)


def test_an_export_rewritten_as_an_nnunet_folder_evaluates_to_the_same_numbers(smoke_run: Path, tmp_path: Path) -> None:
    """The smoke run's exported test maps, written as nnU-Net writes them (``(C, z, y, x)`` .npz beside a
    segmentation with the image's geometry), give ``evaluate`` the same report to 1e-6."""
    from segcalib.config import load_config
    from segcalib.data import load_manifest
    from segcalib.export import ExportOptions, export
    from tests.predictions.nnunet_folders import write_like_nnunet

    manifest = Path(load_config(smoke_run / "config.yaml").data.manifest)
    export(smoke_run, manifest, tmp_path / "segcalib", ExportOptions(progress=False))
    for case in load_manifest(manifest).labelled("test"):
        probs_xyzc = np.asarray(nib.load(str(tmp_path / "segcalib" / f"{case.case_id}_probs.nii.gz")).dataobj)
        write_like_nnunet(tmp_path / "nnunet", case.case_id, probs_xyzc.transpose(3, 2, 1, 0), case.images[0])
    reports = {}
    for name in ("segcalib", "nnunet"):
        assert main(["evaluate", "--predictions", str(tmp_path / name), "--manifest", str(manifest), "--split", "test",
                     "--no-uncertainty", "--output", str(tmp_path / f"report_{name}")]) == 0
        reports[name] = json.loads((tmp_path / f"report_{name}" / "report.json").read_text())
    assert reports["nnunet"]["metadata"]["prediction_format"] == "nnunet"
    a, b = reports["segcalib"]["summary"], reports["nnunet"]["summary"]
    keys = ["dice_fg", "hd95", "assd", "ece_all", "ece_foreground", "ece_boundary", "cece", "nll", "brier"]
    assert [b[k] for k in keys] == pytest.approx([a[k] for k in keys], rel=1e-6, abs=1e-9)
