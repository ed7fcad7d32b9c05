"""Dataset checks: every bad input gives one DataError naming the case and the file."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segcalib.data import check_manifest, load_manifest
from segcalib.errors import DataError
from tests.synthetic import make_dataset, write_nifti


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path, n_cases=4, splits={"training": 2, "validation": 1, "test": 1})


def _check(path: Path):
    return check_manifest(load_manifest(path))


def test_good_dataset_summary(dataset: Path) -> None:
    summary = _check(dataset)
    text = summary.format()
    assert "training 2, validation 1, test 1" in text
    assert "20..20 x 24..24 x 16..16" in text
    assert "1 x 1 x 1 mm (4 cases)" in text
    counts = summary.reports[0].label_counts
    label = nib.load(str(dataset.parent / "labelsTr" / "case_000.nii.gz")).get_fdata()
    assert counts == {k: int((label == k).sum()) for k in (0, 1, 2)}
    assert summary.warnings == []


def _expect(dataset: Path, *fragments: str) -> None:
    with pytest.raises(DataError) as info:
        _check(dataset)
    text = str(info.value)
    for fragment in fragments:
        assert fragment in text, text


def test_missing_file(dataset: Path) -> None:
    (dataset.parent / "labelsTr" / "case_001.nii.gz").unlink()
    _expect(dataset, "case case_001", "labelsTr/case_001.nii.gz", "does not exist")


def test_truncated_gz(dataset: Path) -> None:
    path = dataset.parent / "imagesTr" / "case_002.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _expect(dataset, "case case_002", "imagesTr/case_002.nii.gz")


def test_shape_mismatch(dataset: Path) -> None:
    write_nifti(dataset.parent / "labelsTr" / "case_000.nii.gz", np.zeros((20, 24, 15), np.uint8))
    _expect(dataset, "case case_000", "labelsTr/case_000.nii.gz", "shape (20, 24, 15)", "(20, 24, 16)")


def test_affine_mismatch(dataset: Path) -> None:
    label = nib.load(str(dataset.parent / "labelsTr" / "case_003.nii.gz")).get_fdata().astype(np.uint8)
    shifted = np.eye(4)
    shifted[0, 3] = 0.01
    write_nifti(dataset.parent / "labelsTr" / "case_003.nii.gz", label, shifted)
    _expect(dataset, "case case_003", "different affines", "0.01")


def test_affine_within_tolerance_is_accepted(dataset: Path) -> None:
    label = nib.load(str(dataset.parent / "labelsTr" / "case_003.nii.gz")).get_fdata().astype(np.uint8)
    shifted = np.eye(4)
    shifted[0, 3] = 5e-5
    write_nifti(dataset.parent / "labelsTr" / "case_003.nii.gz", label, shifted)
    _check(dataset)


def test_undeclared_label_value(dataset: Path) -> None:
    label = nib.load(str(dataset.parent / "labelsTr" / "case_001.nii.gz")).get_fdata().astype(np.uint8)
    label[0, 0, 0] = 7
    write_nifti(dataset.parent / "labelsTr" / "case_001.nii.gz", label)
    _expect(dataset, "case case_001", "value(s) [7] not declared")


def test_nan_in_image(dataset: Path) -> None:
    image = nib.load(str(dataset.parent / "imagesTr" / "case_002.nii.gz")).get_fdata().astype(np.float32)
    image[1, 2, 3] = np.nan
    image[2, 2, 3] = np.inf
    write_nifti(dataset.parent / "imagesTr" / "case_002.nii.gz", image)
    _expect(dataset, "case case_002", "imagesTr/case_002.nii.gz", "2 voxel(s) are NaN or infinite")


def test_non_integer_label(dataset: Path) -> None:
    label = nib.load(str(dataset.parent / "labelsTr" / "case_001.nii.gz")).get_fdata().astype(np.float32)
    label[0, 0, 0] = 0.5
    write_nifti(dataset.parent / "labelsTr" / "case_001.nii.gz", label)
    _expect(dataset, "case case_001", "non-integer")


def test_all_problems_are_listed_in_one_message(dataset: Path) -> None:
    (dataset.parent / "labelsTr" / "case_001.nii.gz").unlink()
    (dataset.parent / "imagesTr" / "case_002.nii.gz").write_bytes(b"not a nifti")
    _expect(dataset, "2 problems found", "case case_001", "case case_002")


def test_not_a_nifti_file(dataset: Path) -> None:
    (dataset.parent / "imagesTr" / "case_000.nii.gz").write_bytes(gzip.compress(b"\x00" * 400))
    _expect(dataset, "case case_000", "imagesTr/case_000.nii.gz")


def test_channel_count_must_match_modalities(dataset: Path) -> None:
    raw = json.loads(dataset.read_text())
    raw["modality"] = {"0": "T1", "1": "T2"}
    dataset.write_text(json.dumps(raw))
    _expect(dataset, "1 channel(s) but the manifest declares 2")


def test_embedded_manifests_pass(repo_root: str) -> None:
    for path in sorted(Path(repo_root, "data_manifests").glob("*.json")):
        summary = _check(path)
        assert summary.warnings == []
        assert all(r.label_counts.keys() == {0, 1, 2} for r in summary.reports)
