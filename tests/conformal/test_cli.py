"""``segcalib conformal fit / apply`` end to end on a folder of synthetic 4D NIfTI maps: the
chosen threshold checked by brute force from the written files, masks in the input geometry,
and every refusal (exit 2, one message)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from segcalib.cli import main
from segcalib.conformal.grids import threshold_grid
from segcalib.spatial.morphology import dilate_ellipsoid
from tests.conformal._synthetic import SPACING, synthetic_case
from tests.synthetic import write_nifti

AFFINE = np.array([[-SPACING[0], 0, 0, 12.0], [0, -SPACING[1], 0, -7.0], [0, 0, SPACING[2], 3.0], [0, 0, 0, 1]])
N_VAL, N_TEST = 24, 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Labels, images, a manifest (validation / test), probability maps and logit maps."""
    root = tmp_path_factory.mktemp("conformal_data")
    entries = []
    for i in range(N_VAL + N_TEST):
        probs, label = synthetic_case(100 + i)
        write_nifti(root / "labels" / f"case_{i:02d}.nii.gz", label, AFFINE)
        write_nifti(root / "images" / f"case_{i:02d}.nii.gz", label.astype(np.float32), AFFINE)
        split = "val_maps" if i < N_VAL else "test_maps"
        write_nifti(root / split / f"case_{i:02d}_probs.nii.gz", np.moveaxis(probs, 0, -1), AFFINE)
        logits = np.log(np.clip(probs, 1e-30, None)).astype(np.float32)
        write_nifti(root / "test_logits" / f"case_{i:02d}_logits.nii.gz", np.moveaxis(logits, 0, -1), AFFINE)
        entries.append({"image": f"images/case_{i:02d}.nii.gz", "label": f"labels/case_{i:02d}.nii.gz"})
    labels = {"0": "background", "1": "left", "2": "right"}
    manifest = {"name": "ConformalSynthetic", "labels": labels, "modality": {"0": "MRI"},
                "training": [], "validation": entries[:N_VAL], "test": entries[N_VAL:]}
    (root / "dataset.json").write_text(json.dumps(manifest))
    bare = dict(manifest, test=[e["image"] for e in entries[N_VAL:]])
    (root / "bare_test.json").write_text(json.dumps(bare))
    return root


def _read(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _fnr_at(root: Path, k: int, t: float) -> np.ndarray:
    """Per-case 1 - recall of ``p_k >= t`` over the validation cases, from the written files."""
    out = []
    for i in range(N_VAL):
        p = _read(root / "val_maps" / f"case_{i:02d}_probs.nii.gz")[..., k]
        truth = _read(root / "labels" / f"case_{i:02d}.nii.gz") == k
        if truth.any():
            out.append(1 - ((p >= np.float32(t)) & truth).sum() / truth.sum())
    return np.array(out)


def test_fit_chooses_the_crc_threshold_and_apply_writes_it_in_the_input_geometry(dataset: Path, tmp_path: Path) -> None:
    alpha = 0.2
    assert main(["conformal", "fit", "--predictions", str(dataset / "val_maps"), "--manifest", str(dataset / "dataset.json"),
                 "--risk", "fnr", "--alpha", str(alpha), "--inner-alpha", "0.2", "--delta", "0.2",
                 "--output", str(tmp_path / "conf"), "--quiet"]) == 0
    record = json.loads((tmp_path / "conf" / "conformal.json").read_text())
    assert record["channels"] == ["left", "right", "foreground"] and record["method"] == "crc"
    grid = list(threshold_grid())
    for row in record["targets"][:2]:
        k, t = row["class"], row["threshold"]
        losses = _fnr_at(dataset, k, t)
        n = len(losses)
        assert row["n"] == n and len(row["absent"]) == N_VAL - n
        assert (n * losses.mean() + 1) / (n + 1) <= alpha  # the CRC condition holds at the chosen threshold
        above = grid[grid.index(t) - 1]  # the next smaller mask on the grid
        harder = _fnr_at(dataset, k, above)
        assert (n * harder.mean() + 1) / (n + 1) > alpha  # ... and fails one step smaller
        assert "misses on average at most a fraction 0.2" in row["guarantee"]
    assert main(["conformal", "apply", "--conformal", str(tmp_path / "conf"), "--predictions", str(dataset / "test_maps"),
                 "--output", str(tmp_path / "masks"), "--quiet"]) == 0
    for i in range(N_VAL, N_VAL + N_TEST):
        img = nib.load(str(tmp_path / "masks" / f"case_{i:02d}_conformal.nii.gz"))
        probs = _read(dataset / "test_maps" / f"case_{i:02d}_probs.nii.gz")
        np.testing.assert_allclose(img.affine, AFFINE, atol=1e-6)
        masks = np.asarray(img.dataobj)
        assert masks.dtype == np.uint8 and masks.shape == (*probs.shape[:3], 3)
        for c, row in enumerate(record["targets"]):
            p = probs[..., c + 1] if row["class"] else np.clip(np.float32(1) - probs[..., 0], 0, 1)
            np.testing.assert_array_equal(masks[..., c], p >= np.float32(row["threshold"]))
            inner = np.asarray(nib.load(str(tmp_path / "masks" / f"case_{i:02d}_conformal_inner.nii.gz")).dataobj)
            expected = p >= np.float32(row["inner"]["threshold"]) if row["inner"]["threshold"] is not None else False
            np.testing.assert_array_equal(inner[..., c], expected)
    # logits of the same cases give the same masks (softmax of log p = p, up to float32 rounding near t)
    assert main(["conformal", "apply", "--conformal", str(tmp_path / "conf"), "--predictions", str(dataset / "test_logits"),
                 "--output", str(tmp_path / "masks_logits"), "--quiet"]) == 0
    a = _read(tmp_path / "masks" / f"case_{N_VAL:02d}_conformal.nii.gz")
    b = _read(tmp_path / "masks_logits" / f"case_{N_VAL:02d}_conformal.nii.gz")
    assert (a != b).mean() < 1e-3


def test_margin_fit_and_apply_dilate_the_argmax_by_the_chosen_mm(dataset: Path, tmp_path: Path) -> None:
    assert main(["conformal", "fit", "--predictions", str(dataset / "val_maps"), "--manifest", str(dataset / "dataset.json"),
                 "--risk", "margin", "--alpha", "0.05", "--margin-step-mm", "0.1", "--margin-max-mm", "10",
                 "--output", str(tmp_path / "conf"), "--quiet"]) == 0
    record = json.loads((tmp_path / "conf" / "conformal.json").read_text())
    assert main(["conformal", "apply", "--conformal", str(tmp_path / "conf"), "--predictions", str(dataset / "test_maps"),
                 "--output", str(tmp_path / "masks"), "--quiet"]) == 0
    probs = _read(dataset / "test_maps" / f"case_{N_VAL:02d}_probs.nii.gz")
    masks = _read(tmp_path / "masks" / f"case_{N_VAL:02d}_conformal.nii.gz")
    for c, row in enumerate(record["targets"][:2]):
        r = row["margin_mm"]
        assert r is not None and r > 0, row  # at alpha 0.05 the argmax mask must grow
        pred = torch.from_numpy(probs.argmax(-1) == row["class"])
        np.testing.assert_array_equal(masks[..., c], dilate_ellipsoid(pred, SPACING, r).numpy())


def _fails(args: list[str], capsys, *needles: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("segcalib: error:") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_bad_input_exits_2_with_one_message(dataset: Path, tmp_path: Path, capsys) -> None:
    fit = ["conformal", "fit", "--predictions", str(dataset / "val_maps"), "--manifest", str(dataset / "dataset.json"),
           "--quiet"]
    _fails(fit + ["--alpha", "1.5", "--output", str(tmp_path / "a")], capsys, "alpha", "outside (0, 1)")
    _fails(fit + ["--alpha", "0", "--output", str(tmp_path / "a")], capsys, "alpha")
    _fails(fit + ["--alpha", "0.02", "--output", str(tmp_path / "a")], capsys, "needs at least 49",
           "trivial full mask")
    _fails(fit + ["--risk", "fdr", "--alpha", "0.05", "--output", str(tmp_path / "a")], capsys, "Learn-then-Test",
           "empty mask")
    _fails(["conformal", "fit", "--predictions", str(dataset / "test_maps"), "--manifest", str(dataset / "bare_test.json"),
            "--split", "test", "--output", str(tmp_path / "a"), "--quiet"], capsys, "no labelled cases")
    assert not (tmp_path / "a" / "conformal.json").exists()
    # a fit on 3 classes applied to 4-class maps
    assert main(fit + ["--alpha", "0.2", "--output", str(tmp_path / "conf")]) == 0
    probs, _ = synthetic_case(0)
    four = np.concatenate([probs, np.zeros_like(probs[:1])])
    write_nifti(tmp_path / "four" / "case_x_probs.nii.gz", np.moveaxis(four, 0, -1), AFFINE)
    _fails(["conformal", "apply", "--conformal", str(tmp_path / "conf"), "--predictions", str(tmp_path / "four"),
            "--output", str(tmp_path / "out"), "--quiet"], capsys, "4 classes", "3")
    _fails(["conformal", "apply", "--conformal", str(tmp_path / "nothing"), "--predictions", str(dataset / "test_maps"),
            "--output", str(tmp_path / "out2"), "--quiet"], capsys, "conformal.json")


def test_cli_risk_choices_are_the_library_risks() -> None:
    from segcalib.cli import build_parser
    from segcalib.conformal import RISKS

    fit = build_parser(["conformal", "fit"])
    for risk in RISKS:
        args = fit.parse_args(["conformal", "fit", "--predictions", "p", "--manifest", "m", "--output", "o", "--risk", risk])
        assert args.risk == risk


def test_evaluate_conformal_section_equals_the_written_masks(dataset: Path, tmp_path: Path, capsys) -> None:
    manifest = str(dataset / "dataset.json")
    assert main(["conformal", "fit", "--predictions", str(dataset / "val_maps"), "--manifest", manifest, "--alpha", "0.2",
                 "--inner-alpha", "0.3", "--delta", "0.2", "--output", str(tmp_path / "conf"), "--quiet"]) == 0
    assert main(["conformal", "apply", "--conformal", str(tmp_path / "conf"), "--predictions", str(dataset / "test_maps"),
                 "--output", str(tmp_path / "masks"), "--quiet"]) == 0
    assert main(["evaluate", "--predictions", str(dataset / "test_maps"), "--manifest", manifest, "--split", "test",
                 "--no-uncertainty", "--conformal", str(tmp_path / "conf"), "--output", str(tmp_path / "report")]) == 0
    assert "conformal fnr left: test risk" in capsys.readouterr().out
    section = json.loads((tmp_path / "report" / "report.json").read_text())["conformal"]
    for c, name in enumerate(("left", "right", "foreground")):
        fnr, size, inner_fdr = [], [], []
        for i in range(N_VAL, N_VAL + N_TEST):  # from the files conformal apply wrote
            label = _read(dataset / "labels" / f"case_{i:02d}.nii.gz")
            truth = label != 0 if name == "foreground" else label == c + 1
            if not truth.any():
                continue
            mask = _read(tmp_path / "masks" / f"case_{i:02d}_conformal.nii.gz")[..., c].astype(bool)
            inner = _read(tmp_path / "masks" / f"case_{i:02d}_conformal_inner.nii.gz")[..., c].astype(bool)
            fnr.append(1 - (mask & truth).sum() / truth.sum())
            size.append(mask.sum() / truth.sum())
            inner_fdr.append((inner & ~truth).sum() / inner.sum() if inner.any() else 0.0)
        row = section["targets"][name]
        assert row["n"] == len(fnr) and row["test_risk"] == pytest.approx(np.mean(fnr), abs=1e-12)
        assert row["size_vs_truth"] == pytest.approx(np.mean(size), abs=1e-12)
        assert row["inner"]["fdr"] == pytest.approx(np.mean(inner_fdr), abs=1e-12)
    # the report's case views outline the foreground band: the masks conformal apply wrote
    from segcalib.conformal.evaluation import foreground_band
    from segcalib.conformal.record import read_record
    from segcalib.predictions import open_predictions

    maps = open_predictions(dataset / "test_maps")
    case = f"case_{N_VAL:02d}"
    pred = maps.read(case)
    probs = pred.values if pred.kind == "probs" else np.exp(pred.values) / np.exp(pred.values).sum(0)
    inner, outer = foreground_band(read_record(tmp_path / "conf"), probs.astype(np.float32), pred.spacing)
    assert np.array_equal(outer, _read(tmp_path / "masks" / f"{case}_conformal.nii.gz")[..., 2].astype(bool))
    assert np.array_equal(inner, _read(tmp_path / "masks" / f"{case}_conformal_inner.nii.gz")[..., 2].astype(bool))
    assert "report.html" in {p.name for p in (tmp_path / "report").iterdir()}


def test_nnunet_folder_masks_lie_on_the_segmentation_geometry(tmp_path: Path) -> None:
    from segcalib.data import read_header
    from tests.predictions.nnunet_folders import blob_label_zyx, nnunet_logits, softmax, write_like_nnunet, write_sitk

    entries = []
    for i in range(6):
        label = blob_label_zyx(seed=i)
        write_sitk(tmp_path / "labels" / f"case_{i}.nii.gz", label)
        entries.append({"image": f"labels/case_{i}.nii.gz", "label": f"labels/case_{i}.nii.gz"})
        write_like_nnunet(tmp_path / "nnunet", f"case_{i}", softmax(nnunet_logits(label, seed=i)),
                          tmp_path / "labels" / f"case_{i}.nii.gz")
    manifest = {"name": "nn", "labels": {"0": "background", "1": "liver", "2": "tumour"}, "modality": {"0": "CT"},
                "training": [], "validation": entries}
    (tmp_path / "dataset.json").write_text(json.dumps(manifest))
    assert main(["conformal", "fit", "--predictions", str(tmp_path / "nnunet"), "--manifest", str(tmp_path / "dataset.json"),
                 "--alpha", "0.2", "--output", str(tmp_path / "conf"), "--quiet"]) == 0
    record = json.loads((tmp_path / "conf" / "conformal.json").read_text())
    assert record["prediction_format"] == "nnunet"
    assert main(["conformal", "apply", "--conformal", str(tmp_path / "conf"), "--predictions", str(tmp_path / "nnunet"),
                 "--output", str(tmp_path / "masks"), "--quiet"]) == 0
    seg = tmp_path / "nnunet" / "case_0.nii.gz"
    img = nib.load(str(tmp_path / "masks" / "case_0_conformal.nii.gz"))
    np.testing.assert_allclose(read_header(tmp_path / "masks" / "case_0_conformal.nii.gz").affine,
                               read_header(seg).affine, atol=1e-5)
    with np.load(tmp_path / "nnunet" / "case_0.npz") as archive:
        probs_xyz = archive["probabilities"].transpose(0, 3, 2, 1)  # (C, z, y, x) -> (C, x, y, z)
    masks = np.asarray(img.dataobj)
    np.testing.assert_array_equal(masks[..., 0], probs_xyz[1] >= np.float32(record["targets"][0]["threshold"]))
