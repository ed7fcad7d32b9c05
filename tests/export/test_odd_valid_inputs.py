"""Odd but valid datasets through export -> evaluate with the real smoke model: an external test
set (a manifest with a ``test`` list only), a 2D case beside a 3D one, ACDC-style label names and
an ACDC-style header (unit sform, spacing only in pixdim)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segcalib.cli import main
from segcalib.data import read_header
from tests.synthetic import blob_case, write_nifti

SPACING_2D = np.diag([0.9, 0.8, 1.0, 1.0])


@pytest.fixture(scope="module")
def external(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("external")
    image, label = blob_case((30, 28, 1), seed=3)
    write_nifti(root / "flat.nii.gz", image[..., 0], SPACING_2D)
    write_nifti(root / "flat_gt.nii.gz", label[..., 0], SPACING_2D)
    image, label = blob_case((20, 24, 16), seed=4)
    for name, array in (("acdc.nii.gz", image), ("acdc_gt.nii.gz", label)):
        img = nib.Nifti1Image(array, np.eye(4))  # unit sform/qform, true spacing in pixdim only
        img.set_sform(np.eye(4), 1)
        img.set_qform(np.eye(4), 1)
        img.header["pixdim"][1:4] = [1.5, 1.5, 3.0]
        nib.save(img, str(root / name))
    manifest = root / "external.json"
    manifest.write_text(json.dumps({
        "labels": {"0": "background", "1": "Anterior", "2": "Posterior"}, "modality": {"0": "MRI"},
        "test": [{"image": "flat.nii.gz", "label": "flat_gt.nii.gz"}, {"image": "acdc.nii.gz", "label": "acdc_gt.nii.gz"}],
    }))
    return manifest


def test_external_2d_and_acdc_cases_export_and_evaluate(smoke_run: Path, external: Path, tmp_path: Path, capsys) -> None:
    pred = tmp_path / "pred"
    assert main(["data", "check", str(external)]) == 0
    assert main(["export", "--run", str(smoke_run), "--manifest", str(external), "--output", str(pred),
                 "--device", "cpu"]) == 0, capsys.readouterr().err
    names = sorted(p.name for p in pred.iterdir())
    assert names == ["acdc_probs.nii.gz", "acdc_seg.nii.gz", "export.json", "flat_probs.nii.gz", "flat_seg.nii.gz"]
    # 2D in, 2D out (the class axis stays NIfTI's fourth)
    assert nib.load(str(pred / "flat_seg.nii.gz")).shape == (30, 28)
    assert nib.load(str(pred / "flat_probs.nii.gz")).shape == (30, 28, 1, 3)
    assert np.allclose(nib.load(str(pred / "flat_seg.nii.gz")).affine, SPACING_2D, atol=1e-6)
    # ACDC-style header: the maps carry the true spacing in sform and qform, for nibabel/MONAI too
    for name in ("acdc_probs.nii.gz", "acdc_seg.nii.gz"):
        img = nib.load(str(pred / name))
        assert np.allclose(img.affine, np.diag([1.5, 1.5, 3.0, 1.0]), atol=1e-6)
        assert np.allclose(img.get_qform(), img.get_sform()) and img.header.get_xyzt_units()[0] == "mm"
        assert not read_header(pred / name).spacing_disagrees

    report_dir = tmp_path / "report"
    assert main(["evaluate", "--predictions", str(pred), "--manifest", str(external), "--output", str(report_dir),
                 "--device", "cpu"]) == 0, capsys.readouterr().err
    report = json.loads((report_dir / "report.json").read_text())
    assert [row["case"] for row in report["cases"]] == ["flat", "acdc"]
    assert report["cases"][0]["spacing"] == pytest.approx([0.9, 0.8, 1.0])
    assert report["cases"][1]["spacing"] == pytest.approx([1.5, 1.5, 3.0])
    # the 2D case's Dice, recomputed from the written files
    seg = np.asarray(nib.load(str(pred / "flat_seg.nii.gz")).dataobj)
    label = np.asarray(nib.load(str(external.parent / "flat_gt.nii.gz")).dataobj)
    for entry in report["cases"][0]["classes"]:
        k = entry["class"]
        denominator = (seg == k).sum() + (label == k).sum()
        expected = 2 * ((seg == k) & (label == k)).sum() / denominator if denominator else float("nan")
        assert entry["dice"] == pytest.approx(expected, abs=1e-6, nan_ok=True)
