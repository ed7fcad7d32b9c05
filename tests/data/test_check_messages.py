"""data check messages: image/label affines that differ by a flip or an axis swap say that both
describe the same physical space; other differences do not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from segcalib.data import check_manifest, load_manifest
from segcalib.errors import DataError
from tests.synthetic import LPS_ANISO, blob_case, make_dataset, write_nifti

SHAPE = (8, 8, 6)


def _voxel_reorder(axes: tuple[int, int, int], flips: tuple[bool, bool, bool]) -> np.ndarray:
    """4x4 map from the reordered label's voxel index to the image's voxel index."""
    m = np.zeros((4, 4))
    m[3, 3] = 1
    for image_axis, label_axis in enumerate(axes):
        m[image_axis, label_axis] = -1.0 if flips[image_axis] else 1.0
        m[image_axis, 3] = SHAPE[image_axis] - 1 if flips[image_axis] else 0
    return m


def _rewrite_label(root: Path, affine: np.ndarray, reorder: np.ndarray | None) -> None:
    image, label = blob_case(SHAPE, seed=0)
    array = label
    if reorder is not None:  # store the same world labels in another voxel order
        axes = [int(np.flatnonzero(reorder[a, :3])[0]) for a in range(3)]
        inverse = np.argsort(axes)
        array = np.transpose(label, inverse)
        for label_axis in range(3):
            image_axis = axes.index(label_axis)
            if reorder[image_axis, label_axis] < 0:
                array = np.flip(array, label_axis)
    write_nifti(root / "labelsTr" / "case_000.nii.gz", np.ascontiguousarray(array), affine)


@pytest.mark.parametrize(
    "axes, flips",
    [((0, 1, 2), (True, False, False)), ((0, 1, 2), (True, True, False)), ((1, 0, 2), (False, False, True))],
)
def test_flipped_label_says_it_is_the_same_physical_space(tmp_path: Path, axes, flips) -> None:
    manifest = make_dataset(tmp_path, n_cases=1, shape=SHAPE, affine=LPS_ANISO, splits={"training": 1})
    reorder = _voxel_reorder(axes, flips)
    label_affine = LPS_ANISO @ reorder
    _rewrite_label(tmp_path, label_affine, reorder)
    with pytest.raises(DataError) as info:
        check_manifest(load_manifest(manifest))
    message = str(info.value)
    assert "have different affines" in message and "both describe the same physical space" in message
    for image_axis, label_axis in enumerate(axes):
        if flips[image_axis] or label_axis != image_axis:
            assert f"image axis {image_axis} = label axis {label_axis}{' reversed' if flips[image_axis] else ''}" in message


def test_a_shifted_label_is_not_called_the_same_space(tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path, n_cases=1, shape=SHAPE, affine=LPS_ANISO, splits={"training": 1})
    shifted = LPS_ANISO.copy()
    shifted[0, 3] += 3.0
    _rewrite_label(tmp_path, shifted, None)
    with pytest.raises(DataError) as info:
        check_manifest(load_manifest(manifest))
    assert "have different affines" in str(info.value) and "same physical space" not in str(info.value)
