"""Volume geometry: ITK-consistent spacing, agreement with SimpleITK, header-preserving writes."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from segcalib.data import check_manifest, load_manifest, read_header, read_volume, save_like
from segcalib.data.volumes import itk_consistent_affine
from tests.synthetic import LPS_ANISO, make_dataset, write_nifti


def _acdc_like(path: Path, shape=(12, 10, 6)) -> Path:
    """A unit sform/qform with the true 1.5 x 1.5 x 10 mm spacing only in pixdim (as ACDC ships)."""
    img = nib.Nifti1Image(np.arange(np.prod(shape), dtype=np.float32).reshape(shape), np.eye(4))
    img.set_sform(np.eye(4), 1)
    img.set_qform(np.eye(4), 1)
    img.header["pixdim"][1:4] = [1.5, 1.5, 10.0]
    nib.save(img, str(path))
    return path


def _sitk_affine(path: Path) -> np.ndarray:
    """The RAS affine implied by SimpleITK's spacing, direction and origin (LPS)."""
    image = sitk.ReadImage(str(path))
    direction = np.array(image.GetDirection()).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.array(image.GetSpacing())[None]
    lps[:3, 3] = image.GetOrigin()
    return np.diag([-1, -1, 1, 1]) @ lps


def test_header_disagreement_is_read_like_itk(tmp_path: Path) -> None:
    path = _acdc_like(tmp_path / "acdc.nii.gz")
    header = read_header(path)
    assert nib.load(str(path)).header.get_zooms()[:3] == (1.5, 1.5, 10.0)
    assert np.allclose(nib.load(str(path)).affine, np.eye(4))  # nibabel's view: 1 mm
    assert header.spacing == pytest.approx((1.5, 1.5, 10.0))
    assert header.header_spacing == pytest.approx((1.0, 1.0, 1.0))
    assert header.spacing_disagrees
    assert np.allclose(header.affine, _sitk_affine(path), atol=1e-6)


def test_header_disagreement_is_a_warning_in_data_check(tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path, n_cases=3, shape=(12, 10, 6), splits={"training": 3})
    for folder in ("imagesTr", "labelsTr"):
        path = tmp_path / folder / "case_001.nii.gz"
        array = nib.load(str(path)).get_fdata().astype(np.float32)
        img = nib.Nifti1Image(array, np.eye(4))
        img.set_sform(np.eye(4), 1)
        img.set_qform(np.eye(4), 1)
        img.header["pixdim"][1:4] = [1.5, 1.5, 10.0]
        nib.save(img, str(path))
    summary = check_manifest(load_manifest(manifest))
    assert len(summary.warnings) == 2
    warning = summary.warnings[0]
    assert "case case_001" in warning and "imagesTr/case_001.nii.gz" in warning
    assert "1 x 1 x 1 mm" in warning and "1.5 x 1.5 x 10 mm" in warning
    assert "1.5 x 1.5 x 10 mm (1 cases)" in summary.format()


def test_consistent_header_is_unchanged(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "lps.nii.gz", np.zeros((5, 6, 7), np.float32), LPS_ANISO)
    img = nib.load(str(path))
    assert np.allclose(itk_consistent_affine(img), img.affine)
    header = read_header(path)
    assert header.spacing == pytest.approx((0.8, 0.8, 2.5))
    assert not header.spacing_disagrees
    assert np.allclose(header.affine, _sitk_affine(path), atol=1e-5)


def test_read_volume_keeps_voxel_order(tmp_path: Path) -> None:
    array = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    path = write_nifti(tmp_path / "a.nii.gz", array, LPS_ANISO)
    loaded, header = read_volume(path)
    assert loaded.dtype == np.float32 and np.array_equal(loaded, array)
    assert header.shape == (5, 6, 7)


def test_mha_is_read_in_the_same_world(tmp_path: Path) -> None:
    array = np.random.default_rng(1).normal(size=(5, 6, 7)).astype(np.float32)
    nifti = write_nifti(tmp_path / "a.nii.gz", array, LPS_ANISO)
    sitk.WriteImage(sitk.ReadImage(str(nifti)), str(tmp_path / "a.mha"))
    loaded, header = read_volume(tmp_path / "a.mha")
    assert np.allclose(header.affine, read_header(nifti).affine, atol=1e-5)
    assert np.allclose(loaded, array)


@pytest.mark.parametrize("make", ["consistent", "acdc"])
def test_save_like_keeps_the_input_geometry_for_both_readers(tmp_path: Path, make: str) -> None:
    if make == "acdc":
        reference = _acdc_like(tmp_path / "ref.nii.gz")
    else:
        reference = write_nifti(tmp_path / "ref.nii.gz", np.zeros((12, 10, 6), np.float32), LPS_ANISO)
    probs = np.random.default_rng(0).dirichlet(np.ones(3), size=(12, 10, 6)).astype(np.float32)
    out = tmp_path / "probs.nii.gz"
    save_like(probs, reference, out, np.float32)
    ref_img, out_img = nib.load(str(reference)), nib.load(str(out))
    assert out_img.shape == (12, 10, 6, 3)
    # nibabel reads the ITK geometry from the map (an ACDC-style header is rewritten self-consistent)
    assert np.allclose(out_img.affine, read_header(reference).affine)
    assert out_img.header.get_zooms()[:3] == ref_img.header.get_zooms()[:3]
    assert np.allclose(read_header(out).affine, read_header(reference).affine)
    ref_s, out_s = sitk.ReadImage(str(reference)), sitk.ReadImage(str(out))
    assert out_s.GetSpacing()[:3] == pytest.approx(ref_s.GetSpacing())
    assert out_s.GetOrigin()[:3] == pytest.approx(ref_s.GetOrigin())
    assert np.allclose(np.array(out_s.GetDirection()).reshape(4, 4)[:3, :3], np.array(ref_s.GetDirection()).reshape(3, 3))
    assert np.allclose(np.asarray(out_img.dataobj), probs)
