"""MONAI pipelines: orientation, spacing, normalisation, patches (3D) and slices (2D), inversion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from segcalib.config import DataConfig
from segcalib.data import load_manifest
from segcalib.data.datasets import training_dataset, volume_dataset
from segcalib.data.transforms import case_to_item, preprocessing
from tests.synthetic import LPS_ANISO, make_dataset


@pytest.fixture
def lps_dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path, n_cases=2, shape=(12, 10, 6), affine=LPS_ANISO, splits={"training": 2, "validation": 0, "test": 0})


def _cfg(manifest: Path, **kw) -> DataConfig:
    return DataConfig(manifest=manifest, **kw)


def test_orientation_to_ras_flips_the_lps_axes(lps_dataset: Path) -> None:
    manifest = load_manifest(lps_dataset)
    case = manifest.cases("training")[0]
    raw = preprocessing(_cfg(lps_dataset, normalize="none"))(case_to_item(case))
    import nibabel as nib

    original = nib.load(str(case.images[0])).get_fdata()
    image = raw["image"]
    assert image.shape == (1, 12, 10, 6)
    assert np.allclose(image[0].numpy(), original[::-1, ::-1, :])
    affine = image.affine.numpy()
    assert np.allclose(np.diag(affine)[:3], [0.8, 0.8, 2.5])
    # the world position of voxel 0 is the old last voxel along the flipped axes
    assert np.allclose(affine[:3, 3], (LPS_ANISO @ np.array([11, 9, 0, 1]))[:3])
    label = raw["label"]
    assert torch.equal(label[0].round(), torch.as_tensor(nib.load(str(case.label)).get_fdata()[::-1, ::-1].copy()).float())


def test_resampling_to_target_spacing(lps_dataset: Path) -> None:
    case = load_manifest(lps_dataset).cases("training")[0]
    out = preprocessing(_cfg(lps_dataset, spacing=[1.0, 1.0, 1.0]))(case_to_item(case))
    # centre-to-centre extents 8.8, 7.2 and 12.5 mm at 1 mm
    assert tuple(out["image"].shape[1:]) == (10, 8, 14)  # MONAI: (n - 1) * old / new + 1 voxel centres
    assert np.allclose(np.abs(np.diag(out["image"].affine.numpy()))[:3], 1.0)
    assert set(torch.unique(out["label"]).tolist()) <= {0.0, 1.0, 2.0}


def test_zscore_normalisation_is_per_volume(lps_dataset: Path) -> None:
    case = load_manifest(lps_dataset).cases("training")[0]
    image = preprocessing(_cfg(lps_dataset))(case_to_item(case))["image"]
    assert float(image.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(image.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)


def test_preprocessing_inverts_to_the_file_geometry(lps_dataset: Path) -> None:
    case = load_manifest(lps_dataset).cases("training")[0]
    chain = preprocessing(_cfg(lps_dataset, spacing=[1.0, 1.0, 1.0], normalize="none"), with_label=False)
    out = chain(case_to_item(case))
    restored = chain.inverse(out)["image"]
    assert tuple(restored.shape[1:]) == (12, 10, 6)
    assert np.allclose(restored.affine.numpy(), LPS_ANISO, atol=1e-5)


def test_3d_patches(lps_dataset: Path) -> None:
    manifest = load_manifest(lps_dataset)
    cfg = _cfg(lps_dataset, patch_size=[16, 16, 8], samples_per_volume=3)
    samples = training_dataset(cfg, manifest.cases("training"))[0]
    assert len(samples) == 3
    for s in samples:
        assert tuple(s["image"].shape) == (1, 16, 16, 8) and tuple(s["label"].shape) == (1, 16, 16, 8)


def test_2d_slices_along_the_configured_axis(lps_dataset: Path) -> None:
    manifest = load_manifest(lps_dataset)
    for axis, expected in ((2, (1, 16, 16)), (0, (1, 16, 8))):
        patch = [16, 16] if axis == 2 else [16, 8]
        cfg = _cfg(lps_dataset, mode="2d", slice_axis=axis, patch_size=patch, samples_per_volume=2)
        samples = training_dataset(cfg, manifest.cases("training"))[1]
        assert [tuple(s["image"].shape) for s in samples] == [expected, expected]


def test_positive_patches_hold_foreground(lps_dataset: Path) -> None:
    manifest = load_manifest(lps_dataset)
    cfg = _cfg(lps_dataset, patch_size=[4, 4, 2], samples_per_volume=8, positive_fraction=1.0)
    samples = training_dataset(cfg, manifest.cases("training"))[0]
    assert all(float(s["label"].max()) > 0 for s in samples)


def test_volume_dataset_without_labels(lps_dataset: Path) -> None:
    manifest = load_manifest(lps_dataset)
    item = volume_dataset(_cfg(lps_dataset), manifest.cases("training"), with_label=False)[0]
    assert "label" not in item or isinstance(item["label"], str)
    assert tuple(item["image"].shape) == (1, 12, 10, 6)
