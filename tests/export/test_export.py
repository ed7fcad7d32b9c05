"""Export: maps in the input's own geometry (nibabel and SimpleITK agree), sums, argmax, entropy,
temperature, interrupted exports, refusing to mix exports."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from segcalib.config import load_config
from segcalib.data import load_manifest
from segcalib.data.transforms import preprocessing
from segcalib.errors import RunError
from segcalib.inference.temperature import TemperatureRequest
from segcalib.export import ExportOptions, export, output_paths
from segcalib.export.exporter import export_case
from tests.conftest import SMOKE_CONFIG
from tests.synthetic import LPS_ANISO, make_dataset, write_nifti
from tests.export.echo_model import echo_model


def _sitk_geometry(path: Path) -> tuple:
    image = sitk.ReadImage(str(path))
    d = image.GetDimension()
    direction = np.array(image.GetDirection()).reshape(d, d)[:3, :3]
    return image.GetOrigin()[:3], image.GetSpacing()[:3], direction


@pytest.mark.parametrize("spacing", [None, [1.0, 1.0, 1.0]])
def test_lps_anisotropic_case_comes_back_in_its_own_geometry(tmp_path: Path, spacing) -> None:
    manifest = load_manifest(make_dataset(tmp_path / "data", 2, (14, 12, 7), LPS_ANISO, {"test": 1, "training": 1, "validation": 0}))
    cfg = load_config(SMOKE_CONFIG, {"data.manifest": str(manifest.path), "data.spacing": spacing, "data.patch_size": [8, 8, 8],
                                     "model.strides": [2, 2, 2]})
    case = manifest.cases("test")[0]
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in (14, 12, 7)], indexing="ij"), -1)
    ramp = (0.3 * grid[..., 0] + 0.2 * grid[..., 1] + 0.5 * grid[..., 2]).astype(np.float32)
    write_nifti(case.images[0], ramp, LPS_ANISO)  # smooth, so that resampling there and back is nearly exact
    paths = output_paths(tmp_path / "out", case.case_id, ["uncertainty"])
    export_case(echo_model(cfg), case, preprocessing(cfg.data, with_label=False), paths, temperature=1.0)

    image = nib.load(str(case.images[0]))
    probs_img = nib.load(str(paths["probs"]))
    probs = np.asarray(probs_img.dataobj)
    assert probs.shape == (14, 12, 7, 3) and probs.dtype == np.float32
    assert np.allclose(probs_img.affine, image.affine) and np.allclose(probs_img.affine, LPS_ANISO)
    for name in ("probs", "seg", "uncertainty"):
        origin, sp, direction = _sitk_geometry(paths[name])
        ref_origin, ref_sp, ref_dir = _sitk_geometry(case.images[0])
        assert origin == pytest.approx(ref_origin) and sp == pytest.approx(ref_sp) and np.allclose(direction, ref_dir)
    assert np.abs(probs.sum(-1) - 1).max() <= 1e-5
    seg = np.asarray(nib.load(str(paths["seg"])).dataobj)
    assert seg.dtype == np.uint8 and np.array_equal(seg, probs.argmax(-1))
    entropy = -(probs * np.log(np.clip(probs, 1e-12, None))).sum(-1)
    assert np.allclose(np.asarray(nib.load(str(paths["uncertainty"])).dataobj), entropy, atol=1e-5)

    # spatial alignment: log(p1 / p0) is the normalised intensity at the same file voxel
    x = image.get_fdata()
    z = (x - x.mean()) / x.std()
    log_ratio = np.log(probs[..., 1] / probs[..., 0])
    if spacing is None:  # orientation only: exact
        assert np.allclose(log_ratio, z, atol=1e-4)
    else:  # resampled to 1 mm and back: interpolation error only (a one-voxel shift would be ~0.4)
        assert np.abs(log_ratio - z).max() < 0.1


def test_temperature_divides_the_logits(tmp_path: Path) -> None:
    manifest = load_manifest(make_dataset(tmp_path / "data", 2, (10, 10, 10), None, {"test": 1, "training": 1, "validation": 0}))
    cfg = load_config(SMOKE_CONFIG, {"data.manifest": str(manifest.path), "data.patch_size": [8, 8, 8]})
    case = manifest.cases("test")[0]
    out = {}
    for t in (1.0, 3.0):
        paths = output_paths(tmp_path / f"t{t}", case.case_id, ())
        export_case(echo_model(cfg), case, preprocessing(cfg.data, with_label=False), paths, temperature=t)
        out[t] = np.asarray(nib.load(str(paths["probs"])).dataobj)
    # p1/p0 = exp(z) at T=1 and exp(z/3) at T=3
    assert np.allclose(np.log(out[3.0][..., 1] / out[3.0][..., 0]) * 3, np.log(out[1.0][..., 1] / out[1.0][..., 0]), atol=1e-3)


def _smoke_manifest(tmp_path: Path, smoke_run: Path) -> Path:
    return Path(load_config(smoke_run / "config.yaml").data.manifest)


def test_export_cli_path_with_fitted_temperature(smoke_run: Path, tmp_path: Path) -> None:
    manifest = _smoke_manifest(tmp_path, smoke_run)
    out = tmp_path / "export"
    result = export(smoke_run, manifest, out, ExportOptions(temperature=TemperatureRequest("fit", region="foreground"), dtype="float16"))
    info = json.loads((out / "export.json").read_text())
    assert info["status"] == "complete" and info["temperature"] == pytest.approx(result.temperature)
    assert info["temperature_fit"]["region"] == "foreground" and info["temperature_fit"]["voxels_used"] > 1000
    assert info["dtype"] == "float16" and info["config_hash"] and info["versions"]["segcalib"]
    (case,) = load_manifest(manifest).cases("test")
    stored = nib.load(str(out / f"{case.case_id}_probs.nii.gz"))
    assert stored.get_data_dtype() == np.uint16  # 16-bit storage, scaled back to floats on read
    probs = stored.get_fdata(dtype=np.float32)
    assert np.abs(probs.sum(-1) - 1).max() < 3 * 7.7e-6 and probs.min() >= 0 and probs.max() <= 1


def test_interrupted_export_leaves_only_complete_files_and_reruns(smoke_run: Path, tmp_path: Path, monkeypatch) -> None:
    import segcalib.export.writers as writers

    manifest = _smoke_manifest(tmp_path, smoke_run)
    out = tmp_path / "export"
    real = writers.save_like
    calls = {"n": 0}

    def failing(array, reference, path, dtype, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the seg map of the first case: mid-write
            Path(path).write_bytes(b"partial")
            raise KeyboardInterrupt
        return real(array, reference, path, dtype, **kwargs)

    monkeypatch.setattr(writers, "save_like", failing)
    with pytest.raises(KeyboardInterrupt):
        export(smoke_run, manifest, out, ExportOptions())
    assert sorted(p.name for p in out.iterdir()) == ["export.json", [p.name for p in out.glob("*_probs.nii.gz")][0]]
    monkeypatch.setattr(writers, "save_like", real)
    result = export(smoke_run, manifest, out, ExportOptions())
    assert len(result.cases) == 1 and result.skipped == []
    assert not list(out.glob("*.tmp*"))
    again = export(smoke_run, manifest, out, ExportOptions())
    assert again.cases == [] and len(again.skipped) == 1


def test_rerun_of_a_complete_fitted_export_reuses_it_untouched(smoke_run: Path, tmp_path: Path, monkeypatch) -> None:
    import segcalib.export.members as members

    manifest = _smoke_manifest(tmp_path, smoke_run)
    out = tmp_path / "export"
    first = export(smoke_run, manifest, out, ExportOptions(temperature=TemperatureRequest("fit", region="foreground")))
    record = (out / "export.json").read_bytes()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def no_refit(*args, **kwargs):
        raise AssertionError("the temperature was fitted again")

    monkeypatch.setattr(members, "collect_validation_voxels", no_refit)
    again = export(smoke_run, manifest, out, ExportOptions(temperature=TemperatureRequest("fit", region="foreground")))
    assert again.temperature == first.temperature and again.cases == [] and len(again.skipped) == 1
    assert (out / "export.json").read_bytes() == record
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    with pytest.raises(AssertionError, match="fitted again"):  # another region is another request
        export(smoke_run, manifest, out, ExportOptions(temperature=TemperatureRequest("fit", region="all")))


def test_other_settings_in_the_same_folder_are_refused(smoke_run: Path, tmp_path: Path) -> None:
    manifest = _smoke_manifest(tmp_path, smoke_run)
    out = tmp_path / "export"
    export(smoke_run, manifest, out, ExportOptions())
    with pytest.raises(RunError, match="other settings"):
        export(smoke_run, manifest, out, ExportOptions(temperature=TemperatureRequest.parse("2.0")))


def test_foreground_crop_is_undone(tmp_path: Path) -> None:
    manifest = load_manifest(make_dataset(tmp_path / "data", 2, (16, 14, 10), LPS_ANISO, {"test": 1, "training": 1, "validation": 0}))
    case = manifest.cases("test")[0]
    image = np.zeros((16, 14, 10), np.float32)
    image[3:12, 2:9, 4:8] = np.arange(9 * 7 * 4, dtype=np.float32).reshape(9, 7, 4) / 50 + 1
    write_nifti(case.images[0], image, LPS_ANISO)
    cfg = load_config(SMOKE_CONFIG, {"data.manifest": str(manifest.path), "data.crop_foreground": True,
                                     "data.normalize": "none", "data.patch_size": [8, 8, 8]})
    paths = output_paths(tmp_path / "out", case.case_id, ())
    export_case(echo_model(cfg), case, preprocessing(cfg.data, with_label=False), paths, temperature=1.0)
    probs_img = nib.load(str(paths["probs"]))
    probs = np.asarray(probs_img.dataobj)
    assert probs.shape == (16, 14, 10, 3) and np.allclose(probs_img.affine, LPS_ANISO)
    assert np.abs(probs.sum(-1) - 1).max() <= 1e-5
    # on the foreground the echo of the intensity; beyond the crop (4-voxel margin), background
    fg = image > 0
    assert np.allclose(np.log(probs[fg][:, 1] / probs[fg][:, 0]), image[fg], atol=1e-4)
    far = np.ones(image.shape, bool)
    far[max(3 - 4, 0):12 + 4, max(2 - 4, 0):9 + 4, max(4 - 4, 0):8 + 4] = False
    assert far.any() and np.allclose(probs[far][:, 0], 1.0)
