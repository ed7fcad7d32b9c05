"""Issue 21, items 3, 4 and 7 on prediction folders: what the values are decides probabilities;
mixed and duplicate maps are errors naming the files; unused files are ignored; complex arrays and
class-first maps get a clear message."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from segcalib.errors import ConfigError, DataError
from segcalib.predictions import open_predictions
from segcalib.spatial.regions import check_region
from tests.synthetic import write_nifti

SHAPE = (6, 5, 4)


def _probs(seed: int = 0, classes: int = 3) -> np.ndarray:
    """Probabilities (x, y, z, C), float32."""
    z = np.random.default_rng(seed).normal(size=(*SHAPE, classes)) * 2
    p = np.exp(z - z.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def _nnunet(folder: Path, case: str, probs_xyzc: np.ndarray, dtype=np.float32) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    probs_czyx = np.moveaxis(probs_xyzc, -1, 0).transpose(0, 3, 2, 1)
    np.savez_compressed(folder / f"{case}.npz", probabilities=probs_czyx.astype(dtype))
    write_nifti(folder / f"{case}.nii.gz", probs_xyzc.argmax(-1).astype(np.uint8))


def test_input_logits_on_probabilities_names_the_case(tmp_path: Path) -> None:
    _nnunet(tmp_path, "liver_1", _probs())
    with pytest.raises(DataError, match=r"case liver_1: .*liver_1.npz: input=logits, but the values are probabilities"):
        open_predictions(tmp_path, input="logits").read("liver_1")
    assert open_predictions(tmp_path).read("liver_1").kind == "probs"


def test_a_mixed_folder_is_an_error_naming_the_nifti_maps(tmp_path: Path) -> None:
    for i in range(5):
        _nnunet(tmp_path, f"c{i}", _probs(i))
    write_nifti(tmp_path / "c5.nii.gz", _probs(5))  # a sixth case as a 4D NIfTI map
    with pytest.raises(DataError, match=r"mixes nnU-Net .npz maps with NIfTI maps \(.*c5.nii.gz\)"):
        open_predictions(tmp_path)
    (tmp_path / "c5.nii.gz").unlink()
    write_nifti(tmp_path / "c6.nii.gz", _probs(6).argmax(-1).astype(np.uint8))  # 3D, no .npz: not a map
    assert open_predictions(tmp_path).case_ids() == [f"c{i}" for i in range(5)]


def test_duplicate_maps_of_one_case_name_both_files(tmp_path: Path) -> None:
    _nnunet(tmp_path / "a", "x", _probs())
    write_nifti(tmp_path / "a" / "x_probs.nii.gz", _probs())
    with pytest.raises(DataError, match=r"case x: two maps in .*x.npz and .*x_probs.nii.gz"):
        open_predictions(tmp_path / "a")
    _nnunet(tmp_path / "b", "y", _probs())
    write_nifti(tmp_path / "b" / "y.nii.gz", _probs())  # a 4D map where the segmentation belongs
    with pytest.raises(DataError, match=r"case y: two maps in .*y.npz and the 4D .*y.nii.gz"):
        open_predictions(tmp_path / "b")
    write_nifti(tmp_path / "c" / "z.nii.gz", _probs())
    np.savez(tmp_path / "c" / "stray.npz", probabilities=np.zeros(3))
    with pytest.raises(DataError, match=r"a nifti folder that also holds nnU-Net .npz maps \(.*stray.npz\)"):
        open_predictions(tmp_path / "c", format="nifti")


@pytest.mark.parametrize("layout", ["nnunet", "nifti"])
def test_an_unused_malformed_dataset_json_is_ignored(tmp_path: Path, layout: str) -> None:
    if layout == "nnunet":
        _nnunet(tmp_path, "x", _probs())
    else:
        write_nifti(tmp_path / "x.nii.gz", _probs())
    (tmp_path / "dataset.json").write_text("{not json")
    (tmp_path / "plans.json").write_text("[]")
    folder = open_predictions(tmp_path)
    assert folder.case_ids() == ["x"] and folder.read("x").kind == "probs"


def test_complex_npz_is_an_error_without_a_numpy_warning(tmp_path: Path) -> None:
    _nnunet(tmp_path, "x", _probs(), dtype=np.complex64)
    folder = open_predictions(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's ComplexWarning would fail here
        with pytest.raises(DataError, match=r"x.npz: 'probabilities' holds complex numbers"):
            folder.read("x")
        with pytest.raises(DataError, match="complex numbers"):
            folder.class_count("x", expected=3)


def test_class_first_maps_get_a_channel_axis_hint(tmp_path: Path) -> None:
    first = np.zeros((3, 36, 40, 35), dtype=np.float32)
    first[0] = 1.0
    write_nifti(tmp_path / "x.nii.gz", first)
    folder = open_predictions(tmp_path)
    with pytest.raises(DataError, match=r"35 classes .*expected 3 by me; its first axis has 3: .*--channel-axis first"):
        folder.class_count("x", expected=3, by="me")
    assert open_predictions(tmp_path, channel_axis="first").class_count("x", expected=3) == 3


def test_an_unknown_region_is_a_config_error_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"unknown region 'foregound'; did you mean 'foreground'\? valid regions:"):
        check_region("foregound")
