"""nnU-Net v2 ``--save_probabilities`` folders: values land on the label's voxels (checked with
nibabel and SimpleITK) for an oblique, anisotropic, non-RAS case; pickles are never run."""

from __future__ import annotations

import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from segcalib.data import Case, read_header, read_volume
from segcalib.errors import DataError
from segcalib.predictions import check_geometry, match_cases, open_predictions
from tests.predictions.nnunet_folders import (
    CreatesFile,
    blob_label_zyx,
    export_with_nnunetv2,
    nnunet_logits,
    softmax,
    write_like_nnunet,
    write_sitk,
    ORIGIN,
    OBLIQUE,
    SPACING,
)


def _dataset(root: Path, case_id: str = "liver_007", seed: int = 0) -> tuple[Path, Path, np.ndarray]:
    label_zyx = blob_label_zyx(seed=seed)
    image = write_sitk(root / "imagesTs" / f"{case_id}_0000.nii.gz", label_zyx.astype(np.float32) * 10)
    label = write_sitk(root / "labelsTs" / f"{case_id}.nii.gz", label_zyx)
    return image, label, label_zyx


def _check_on_label_voxels(pred, label_path: Path, expected_zyx: np.ndarray) -> None:
    """``pred.values[c, i, j, k]`` is nnU-Net's ``probabilities[c, k, j, i]``, the argmax is
    nnU-Net's segmentation voxel for voxel (nibabel) and the label where the logits were given,
    and each voxel index maps to the same SimpleITK index."""
    label, header = read_volume(label_path, dtype=np.int64)
    assert pred.values.dtype == np.float32 and pred.values.flags.c_contiguous
    assert pred.values.shape == (3, *label.shape)
    np.testing.assert_allclose(pred.values, expected_zyx.transpose(0, 3, 2, 1), atol=2e-6)
    predicted = pred.values.argmax(0)
    assert np.array_equal(predicted, np.asarray(nib.load(str(pred.geometry_file)).dataobj))
    inside = expected_zyx.transpose(0, 3, 2, 1)[0] < 1  # nnU-Net writes background = 1 outside its crop box
    assert inside.sum() > 0.5 * inside.size
    assert np.array_equal(predicted[inside], label[inside])
    check_geometry(pred, header, num_classes=3)
    np.testing.assert_allclose(pred.affine, nib.load(str(label_path)).affine, atol=1e-5)
    ref = sitk.ReadImage(str(label_path))
    assert pred.spacing == pytest.approx(ref.GetSpacing(), abs=1e-6)
    rng = np.random.default_rng(1)
    for ijk in rng.integers(0, label.shape, size=(20, 3)):
        ras = pred.affine @ np.append(ijk, 1.0)
        lps = (-ras[0], -ras[1], ras[2])
        assert ref.TransformPhysicalPointToIndex(lps) == tuple(int(v) for v in ijk)
        assert ref.GetPixel(*[int(v) for v in ijk]) == pred.values[:, ijk[0], ijk[1], ijk[2]].argmax()


@pytest.mark.parametrize("transpose_forward", [(0, 1, 2), (2, 0, 1)])
def test_nnunetv2_export_reads_onto_the_label_voxels(tmp_path: Path, transpose_forward) -> None:
    pytest.importorskip("nnunetv2")
    image, label, label_zyx = _dataset(tmp_path / "data")
    expected = export_with_nnunetv2(tmp_path / "out", "liver_007", image, nnunet_logits(label_zyx), transpose_forward)
    assert (tmp_path / "out" / "liver_007.pkl").exists()  # nnU-Net's own files are all there

    folder = open_predictions(tmp_path / "out")
    assert folder.format == "nnunet" and folder.case_ids() == ["liver_007"]
    assert folder.metadata["labels"] == {"background": 0, "liver": 1, "tumour": 2}
    assert folder.path_of("liver_007") == (tmp_path / "out" / "liver_007.npz", tmp_path / "out" / "liver_007.nii.gz")
    pred = folder.read("liver_007")
    assert pred.kind == "probs" and pred.geometry_file == tmp_path / "out" / "liver_007.nii.gz"
    _check_on_label_voxels(pred, label, expected)


def test_hand_written_folder_matches_cases_and_reads(tmp_path: Path) -> None:
    cases, expected = [], {}
    for i, case_id in enumerate(["a_1", "b_2"]):
        image, label, label_zyx = _dataset(tmp_path / "data", case_id, seed=i)
        expected[case_id] = softmax(nnunet_logits(label_zyx, seed=i))
        write_like_nnunet(tmp_path / "out", case_id, expected[case_id], image)
        cases.append(Case(case_id, (image,), label, "validation"))
    folder = open_predictions(tmp_path / "out", format="nnunet")
    pairs = match_cases(folder, cases[::-1])
    assert [(c.case_id, e.case_id) for c, e in pairs] == [("b_2", "b_2"), ("a_1", "a_1")]
    for case, entry in pairs:
        _check_on_label_voxels(folder.read(entry.case_id), case.label, expected[case.case_id])


def test_a_malicious_pickle_beside_the_maps_is_never_run(tmp_path: Path) -> None:
    image, label, label_zyx = _dataset(tmp_path / "data")
    write_like_nnunet(tmp_path / "out", "liver_007", softmax(nnunet_logits(label_zyx)), image)
    control = tmp_path / "control_marker"
    pickle.loads(pickle.dumps(CreatesFile(control)))  # the payload works when unpickled ...
    assert control.exists()
    marker = tmp_path / "marker"
    with open(tmp_path / "out" / "liver_007.pkl", "wb") as f:
        pickle.dump(CreatesFile(marker), f)
    folder = open_predictions(tmp_path / "out")
    assert folder.path_of("liver_007")[0].suffix == ".npz"
    pred = folder.read("liver_007")
    check_geometry(pred, read_header(label))
    assert not marker.exists()  # ... and reading the folder did not unpickle it

    # an object array inside the .npz needs pickle: refused, and not run
    np.savez(tmp_path / "out" / "liver_007.npz", probabilities=np.array([CreatesFile(marker)], dtype=object))
    with pytest.raises(DataError, match="liver_007.npz.*without pickle"):
        folder.read("liver_007")
    assert not marker.exists()


def test_broken_nnunet_folders_name_the_file(tmp_path: Path) -> None:
    image, label, label_zyx = _dataset(tmp_path / "data")
    probs = softmax(nnunet_logits(label_zyx))
    write_like_nnunet(tmp_path / "out", "liver_007", probs, image)
    np.savez_compressed(tmp_path / "out" / "orphan.npz", probabilities=probs.astype(np.float32))
    folder = open_predictions(tmp_path / "out")
    with pytest.raises(DataError, match=r"orphan.npz: no segmentation"):
        folder.read("orphan")
    with pytest.raises(DataError, match="case orphan: .*orphan.npz has no segmentation"):
        match_cases(folder, [Case("orphan", (image,), label, "validation")])

    np.savez_compressed(tmp_path / "out" / "liver_007.npz", softmax=probs.astype(np.float32))
    with pytest.raises(DataError, match="no 'probabilities' array \\(found softmax\\)"):
        folder.read("liver_007")
    np.savez_compressed(tmp_path / "out" / "liver_007.npz", probabilities=probs[:, :, :, :-1].astype(np.float32))
    with pytest.raises(DataError, match=r"spatial shape \(12, 11, 6\).*liver_007.nii.gz of shape \(13, 11, 6\)"):
        folder.read("liver_007")
    (tmp_path / "out" / "liver_007.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="liver_007.npz: not a readable .npz"):
        folder.read("liver_007")
    # sigmoid (region-based) maps do not sum to 1: refused rather than taken for softmax
    sigmoid = 1 / (1 + np.exp(-nnunet_logits(label_zyx)))
    np.savez_compressed(tmp_path / "out" / "liver_007.npz", probabilities=sigmoid)
    with pytest.raises(DataError, match="not probabilities.*region-based"):
        folder.read("liver_007")


def test_a_2d_case_keeps_its_singleton_axis_out(tmp_path: Path) -> None:
    """nnU-Net stores a 2D case's probabilities as ``(C, 1, y, x)`` and its segmentation in 2D; segcalib
    reads a 2D slice as ``(x, y, 1)``, labels and maps alike."""
    label_yx = blob_label_zyx((1, 11, 13))[0]
    label = write_sitk(tmp_path / "labels" / "slice.nii.gz", label_yx, SPACING[:2], ORIGIN[:2], OBLIQUE[:2, :2])
    probs = softmax(nnunet_logits(label_yx[None]))  # (C, 1, y, x)
    write_like_nnunet(tmp_path / "out", "slice", probs, label)
    pred = open_predictions(tmp_path / "out").read("slice")
    assert pred.values.shape == (3, 13, 11, 1)
    np.testing.assert_allclose(pred.values[..., 0], probs[:, 0].transpose(0, 2, 1), atol=2e-6)
    assert np.array_equal(pred.values.argmax(0), read_volume(label, dtype=np.int64)[0])
    check_geometry(pred, read_header(label), num_classes=3)
    assert pred.spacing[:2] == pytest.approx(SPACING[:2], abs=1e-6) and len(pred.spacing) == 3  # (x, y, 1) reading
