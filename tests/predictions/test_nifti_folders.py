"""segcalib export folders (float32 and 16-bit) and plain 4D NIfTI folders: discovery, values,
geometry (nibabel and SimpleITK agree), memory of one case, file-name rules."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from segcalib.config import load_config
from segcalib.data import load_manifest, read_header, save_like
from segcalib.data.transforms import preprocessing
from segcalib.errors import ConfigError, DataError
from segcalib.export import output_paths
from segcalib.export.exporter import EXPORT_JSON, export_case
from segcalib.predictions import check_geometry, open_predictions, read_nifti_map
from tests.conftest import SMOKE_CONFIG
from tests.export.echo_model import echo_model
from tests.synthetic import LPS_ANISO, make_dataset, write_nifti

SHAPE = (9, 8, 5)


def _probs(shape=SHAPE, n_classes: int = 3, seed: int = 0) -> np.ndarray:
    """Random probabilities, class last, float32."""
    z = np.random.default_rng(seed).normal(size=(*shape, n_classes)) * 2
    e = np.exp(z - z.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_segcalib_export_folder(tmp_path: Path, dtype: str) -> None:
    manifest = load_manifest(make_dataset(tmp_path / "data", 2, (14, 12, 7), LPS_ANISO, {"test": 1, "training": 1, "validation": 0}))
    cfg = load_config(SMOKE_CONFIG, {"data.manifest": str(manifest.path), "data.patch_size": [8, 8, 8], "model.strides": [2, 2, 2]})
    case = manifest.cases("test")[0]
    out = tmp_path / "out"
    paths = output_paths(out, case.case_id, ["uncertainty"])
    export_case(echo_model(cfg), case, preprocessing(cfg.data, with_label=False), paths, temperature=1.0, dtype=dtype)
    (out / EXPORT_JSON).write_text(json.dumps({"status": "complete", "temperature": 1.0}))

    folder = open_predictions(out)
    assert folder.format == "segcalib" and folder.case_ids() == [case.case_id]  # _seg, _uncertainty are not maps
    assert folder.metadata["temperature"] == 1.0 and folder.path_of(case.case_id) == (paths["probs"],)
    pred = folder.read(case.case_id)
    assert pred.kind == "probs" and pred.values.shape == (3, 14, 12, 7) and pred.values.dtype == np.float32
    stored = nib.load(str(paths["probs"]))
    assert (stored.get_data_dtype() == np.uint16) == (dtype == "float16")
    assert np.array_equal(pred.values, np.moveaxis(stored.get_fdata(), -1, 0).astype(np.float32))
    # the model's logits are (0, z, -z) with z the normalised intensity of the same voxel
    x = nib.load(str(case.images[0])).get_fdata()
    z = (x - x.mean()) / x.std()
    logits = np.stack([np.zeros_like(z), z, -z])
    reference = np.exp(logits - logits.max(0)) / np.exp(logits - logits.max(0)).sum(0)
    assert np.abs(pred.values - reference).max() < (1e-4 if dtype == "float32" else 2e-4)
    check_geometry(pred, read_header(case.label), num_classes=3)
    np.testing.assert_allclose(pred.affine, LPS_ANISO, atol=1e-5)
    assert pred.spacing == pytest.approx(sitk.ReadImage(str(paths["probs"])).GetSpacing()[:3])
    assert pred.spacing == pytest.approx((0.8, 0.8, 2.5))


def test_header_with_unit_sform_reads_as_itk_does(tmp_path: Path) -> None:
    """ACDC-style header: a unit sform, the true spacing in pixdim. Map and label both follow ITK."""
    image = nib.Nifti1Image(np.zeros(SHAPE, np.float32), np.eye(4))
    image.header.set_zooms((1.5, 1.25, 10.0))
    image.set_sform(np.eye(4), 1)
    image.set_qform(None, 0)
    nib.save(image, str(tmp_path / "label.nii.gz"))
    (tmp_path / "maps").mkdir()
    broken = nib.Nifti1Image(_probs(), np.eye(4))  # a map from a tool that kept the broken header
    broken.header.set_zooms((1.5, 1.25, 10.0, 1.0))
    broken.set_sform(np.eye(4), 1)
    broken.set_qform(None, 0)
    nib.save(broken, str(tmp_path / "maps" / "p1.nii.gz"))
    pred = open_predictions(tmp_path / "maps").read("p1")
    assert np.allclose(nib.load(str(tmp_path / "maps" / "p1.nii.gz")).affine[:3, :3], np.eye(3))  # what nibabel says
    assert pred.spacing == pytest.approx((1.5, 1.25, 10.0))
    assert pred.spacing == pytest.approx(sitk.ReadImage(str(tmp_path / "maps" / "p1.nii.gz")).GetSpacing()[:3])
    check_geometry(pred, read_header(tmp_path / "label.nii.gz"))


@pytest.mark.parametrize("channel_axis", ["last", "first"])
def test_plain_nifti_maps_either_channel_axis(tmp_path: Path, channel_axis: str) -> None:
    probs = _probs()
    stored = probs if channel_axis == "last" else np.ascontiguousarray(np.moveaxis(probs, -1, 0))
    write_nifti(tmp_path / "maps" / "case_a.nii.gz", stored, LPS_ANISO)
    write_nifti(tmp_path / "label.nii.gz", probs.argmax(-1).astype(np.uint8), LPS_ANISO)
    folder = open_predictions(tmp_path / "maps", channel_axis=channel_axis)
    assert folder.format == "nifti" and folder.case_ids() == ["case_a"]
    pred = folder.read("case_a")
    assert np.array_equal(pred.values, np.moveaxis(probs, -1, 0)) and pred.values.flags.c_contiguous
    assert pred.kind == "probs"
    check_geometry(pred, read_header(tmp_path / "label.nii.gz"), num_classes=3)
    wrong = open_predictions(tmp_path / "maps", channel_axis="first" if channel_axis == "last" else "last")
    with pytest.raises(DataError, match="spatial shape"):
        check_geometry(wrong.read("case_a"), read_header(tmp_path / "label.nii.gz"))


def test_nii_and_nii_gz_mix_and_file_name_rules(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    write_nifti(maps / "a.nii", _probs(seed=1))
    write_nifti(maps / "b.nii.gz", _probs(seed=2))
    write_nifti(maps / "c_probs.nii.gz", _probs(seed=3))
    write_nifti(maps / "c_seg.nii.gz", np.zeros(SHAPE, np.uint8))  # beside c_probs: not a map
    write_nifti(maps / "case 1.nii.gz", _probs(seed=4))  # ids are made file-name safe, as manifest ids
    (maps / "notes.txt").write_text("not a map")
    folder = open_predictions(maps)
    assert folder.case_ids() == ["a", "b", "c", "case_1"]
    assert folder.path_of("a") == (maps / "a.nii",) and folder.path_of("case_1") == (maps / "case 1.nii.gz",)
    for case_id, seed in (("a", 1), ("b", 2), ("c", 3), ("case_1", 4)):
        assert np.array_equal(folder.read(case_id).values, np.moveaxis(_probs(seed=seed), -1, 0))
    with pytest.raises(DataError, match=r"case zz: no prediction map in .*maps \(nifti folder with 4 map"):
        folder.read("zz")

    write_nifti(maps / "a.nii.gz", _probs(seed=1))
    with pytest.raises(DataError, match=r"case a: several maps .*a\.nii, .*a\.nii\.gz"):
        open_predictions(maps)
    (maps / "a.nii.gz").unlink()
    write_nifti(maps / "b_probs.nii.gz", _probs(seed=2))
    with pytest.raises(DataError, match=r"case b: several maps .*b\.nii\.gz, .*b_probs\.nii\.gz"):
        open_predictions(maps)
    (maps / "b_probs.nii.gz").unlink()
    write_nifti(maps / "case_1.nii.gz", _probs(seed=4))
    with pytest.raises(DataError, match=r"case case_1: several maps .*case 1\.nii\.gz, .*case_1\.nii\.gz"):
        open_predictions(maps)


def test_logits_are_preferred_to_probabilities_unless_asked(tmp_path: Path) -> None:
    probs = _probs()
    logits = np.log(probs) + 3.0  # softmax of these is probs
    write_nifti(tmp_path / "x_probs.nii.gz", probs)
    write_nifti(tmp_path / "x_logits.nii.gz", logits.astype(np.float32))
    (tmp_path / EXPORT_JSON).write_text("{}")
    pred = open_predictions(tmp_path).read("x")
    assert pred.kind == "logits" and pred.source.name == "x_logits.nii.gz"
    assert np.allclose(pred.values, np.moveaxis(logits, -1, 0), atol=1e-6)
    pred = open_predictions(tmp_path, input="probs").read("x")
    assert pred.kind == "probs" and pred.source.name == "x_probs.nii.gz"


def test_format_detection_and_bad_options(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="prediction folder does not exist"):
        open_predictions(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no prediction maps found"):
        open_predictions(tmp_path / "empty")
    write_nifti(tmp_path / "plain" / "a.nii.gz", _probs())
    with pytest.raises(DataError, match="no segcalib prediction maps found .*_probs.nii.gz"):
        open_predictions(tmp_path / "plain", format="segcalib")  # no _probs / _logits file
    with pytest.raises(DataError, match="no nnunet prediction maps found"):
        open_predictions(tmp_path / "plain", format="nnunet")
    for kwargs, key in (({"format": "nnU-Net"}, "format"), ({"channel_axis": "middle"}, "channel_axis"),
                        ({"input": "softmax"}, "input")):
        with pytest.raises(ConfigError, match=f"^{key}: "):
            open_predictions(tmp_path / "plain", **kwargs)
    (tmp_path / "plain" / EXPORT_JSON).write_text("[1, 2")
    with pytest.raises(DataError, match="export.json: not readable JSON"):
        open_predictions(tmp_path / "plain")


def test_unreadable_maps_name_the_file(tmp_path: Path) -> None:
    write_nifti(tmp_path / "one_class.nii.gz", _probs()[..., :1])
    write_nifti(tmp_path / "flat.nii.gz", np.zeros((4, 4), np.float32))
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b garbage")
    folder = open_predictions(tmp_path)
    with pytest.raises(DataError, match="one_class.nii.gz: 1 class on the last axis"):
        folder.read("one_class")
    with pytest.raises(DataError, match="flat.nii.gz: a probability/logit map needs a class axis"):
        folder.read("flat")
    with pytest.raises(DataError, match="broken.nii.gz: not a readable NIfTI"):
        folder.read("broken")


@pytest.mark.parametrize("name,quantised", [("m.nii", False), ("m.nii", True), ("m.nii.gz", False)])
def test_one_case_in_memory(tmp_path: Path, name: str, quantised: bool) -> None:
    """Peak memory of a read: the float32 result, plus the decoded file only when it is compressed
    (an uncompressed .nii is memory-mapped; 16-bit values are scaled class by class)."""
    probs = _probs((48, 40, 32), n_classes=4)
    img = nib.Nifti1Image(np.rint(probs * 65535).astype(np.uint16) if quantised else probs, np.eye(4))
    if quantised:
        img.header.set_slope_inter(1 / 65535, 0.0)
    nib.save(img, str(tmp_path / name))
    tracemalloc.start()
    values, _ = read_nifti_map(tmp_path / name)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert np.array_equal(values, np.moveaxis(nib.load(str(tmp_path / name)).get_fdata(), -1, 0).astype(np.float32))
    limit = values.nbytes + 2**18 if name.endswith(".nii") else 2.2 * values.nbytes  # 256 KiB of buffers
    assert peak < limit, peak / values.nbytes
