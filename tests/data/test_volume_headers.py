"""Maps keep the input's dimensionality (2D in, 2D out) and get a self-consistent header when the
input's sform/qform disagree with pixdim; many such files make one grouped warning."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from segcalib.cli import main
from segcalib.data import check_manifest, load_manifest, read_header, read_volume, save_like
from segcalib.data.check import Notices
from segcalib.data.volumes import header_rewritten
from tests.synthetic import LPS_ANISO, blob_case, make_dataset, write_nifti


def _disagreeing(path: Path, array: np.ndarray, sform: np.ndarray, pixdim) -> Path:
    """sform/qform ``sform`` but ``pixdim`` as given (as ACDC ships, unit sform)."""
    img = nib.Nifti1Image(array, sform)
    img.set_sform(sform, 1)
    img.set_qform(sform, 1)
    img.header["pixdim"][1:4] = pixdim
    img.header.set_xyzt_units("unknown")
    nib.save(img, str(path))
    return path


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.floats(0.3, 12.0), min_size=3, max_size=3),
    st.sampled_from([np.eye(3), np.diag([-1.0, -1.0, 1.0]), np.array([[0.0, 1, 0], [1, 0, 0], [0, 0, -1]])]),
    st.lists(st.floats(-50, 50), min_size=3, max_size=3),
)
def test_rewritten_header_is_self_consistent_and_matches_itk(tmp_path_factory, pixdim, direction, origin) -> None:
    folder = tmp_path_factory.mktemp("hdr")
    sform = np.eye(4)
    sform[:3, :3] = direction  # unit spacing in the sform, the true spacing only in pixdim
    sform[:3, 3] = origin
    reference = _disagreeing(folder / "ref.nii.gz", np.zeros((6, 5, 4), np.float32), sform, pixdim)
    itk = sitk.ReadImage(str(reference))
    disagrees = not np.allclose(pixdim, 1.0, rtol=1e-3)
    assert header_rewritten(reference) == disagrees
    out = folder / "seg.nii.gz"
    save_like(np.ones((6, 5, 4), np.uint8), reference, out, np.uint8)
    img = nib.load(str(out))
    expected = read_header(reference).affine
    assert np.allclose(img.get_sform(), expected, atol=1e-4)  # nibabel and MONAI read the true spacing
    assert np.allclose(img.get_qform(), expected, atol=1e-4)
    assert np.allclose(img.header.get_zooms()[:3], pixdim, rtol=1e-5)
    assert not read_header(out).spacing_disagrees
    if disagrees:
        assert img.header.get_xyzt_units()[0] == "mm"
    out_itk = sitk.ReadImage(str(out))  # and ITK reads what it read from the input
    assert out_itk.GetSpacing() == pytest.approx(itk.GetSpacing(), rel=1e-5)
    assert out_itk.GetOrigin() == pytest.approx(itk.GetOrigin(), abs=1e-4)
    assert np.allclose(out_itk.GetDirection(), itk.GetDirection(), atol=1e-5)


def test_consistent_header_is_copied_untouched(tmp_path: Path) -> None:
    reference = write_nifti(tmp_path / "ref.nii.gz", np.zeros((5, 6, 7), np.float32), LPS_ANISO)
    assert not header_rewritten(reference)
    save_like(np.zeros((5, 6, 7), np.uint8), reference, tmp_path / "o.nii.gz", np.uint8)
    ref, out = nib.load(str(reference)).header, nib.load(str(tmp_path / "o.nii.gz")).header
    for key in ("sform_code", "qform_code", "srow_x", "srow_y", "srow_z", "quatern_b", "qoffset_x", "pixdim", "xyzt_units"):
        assert np.array_equal(ref[key][:4] if key == "pixdim" else ref[key], out[key][:4] if key == "pixdim" else out[key])


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha"])
def test_2d_input_is_a_single_slice_and_gets_2d_maps_back(tmp_path: Path, suffix: str) -> None:
    array = np.arange(30, dtype=np.float32).reshape(5, 6)
    nifti = write_nifti(tmp_path / "a.nii.gz", array, np.diag([0.7, 0.8, 1.0, 1.0]))
    path = nifti
    if suffix == ".mha":
        path = tmp_path / "a.mha"
        sitk.WriteImage(sitk.ReadImage(str(nifti)), str(path))
    loaded, header = read_volume(path)
    assert loaded.shape == (5, 6, 1) and np.array_equal(loaded[..., 0], array)
    assert header.shape == (5, 6, 1) and header.ndim == 2
    assert header.spacing == pytest.approx((0.7, 0.8, 1.0))
    save_like(np.zeros((5, 6, 1), np.uint8), path, tmp_path / "seg.nii.gz", np.uint8)
    save_like(np.full((5, 6, 1, 3), 1 / 3, np.float32), path, tmp_path / "probs.nii.gz", np.float32)
    assert nib.load(str(tmp_path / "seg.nii.gz")).shape == (5, 6)  # the input's own dimensionality
    assert nib.load(str(tmp_path / "probs.nii.gz")).shape == (5, 6, 1, 3)  # class axis = NIfTI's 4th
    for out in ("seg", "probs"):
        assert np.allclose(read_header(tmp_path / f"{out}.nii.gz").affine, read_header(nifti).affine, atol=1e-5)
    # and segcalib reads its own 2D output back with the label's shape
    assert read_volume(tmp_path / "seg.nii.gz")[0].shape == (5, 6, 1)


def test_mixed_2d_and_3d_cases_give_a_clean_summary(tmp_path: Path, capsys) -> None:
    manifest = make_dataset(tmp_path, n_cases=3, shape=(8, 8, 4), splits={"training": 2, "test": 1})
    image, label = blob_case((9, 7, 1), seed=5)
    write_nifti(tmp_path / "imagesTr" / "case_001.nii.gz", image[..., 0])
    write_nifti(tmp_path / "labelsTr" / "case_001.nii.gz", label[..., 0])
    assert main(["data", "check", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "shape:    8..9 x 7..8 x 1..4" in out and "2D cases: 1 (single slices" in out


def test_many_header_disagreements_make_one_warning(tmp_path: Path, capsys) -> None:
    manifest = make_dataset(tmp_path, n_cases=6, shape=(6, 5, 4), splits={"training": 6})
    for i in range(6):
        for folder in ("imagesTr", "labelsTr"):
            path = tmp_path / folder / f"case_{i:03d}.nii.gz"
            _disagreeing(path, np.asarray(nib.load(str(path)).dataobj), np.eye(4), [1.5, 1.5, 10.0])
    summary = check_manifest(load_manifest(manifest))
    assert len(summary.warnings) == 12
    text = summary.format()
    warnings = [line for line in text.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert warnings[0].startswith("warning: 12 files have a sform/qform spacing that disagrees with pixdim")
    assert "self-consistent header" in warnings[0] and "Example: case case_000:" in warnings[0]
    assert "1 x 1 x 1 mm disagrees with pixdim 1.5 x 1.5 x 10 mm" in warnings[0]
    assert "--verbose for the list of 12 files" in text
    assert main(["data", "check", str(manifest), "--verbose"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  case case_")]
    assert len(listed) == 12 and any("labelsTr/case_005.nii.gz" in line for line in listed)


def test_notices_keep_single_messages_and_group_repeats() -> None:
    notices = Notices()
    notices.add("other", "a")
    notices.add("header spacing", "only one")
    assert notices.lines() == ["a", "only one"]
    notices.add("header spacing", "second")
    assert notices.lines()[1].startswith("2 files have") and notices.lines(verbose=True)[-2:] == ["  only one", "  second"]
