"""One contract for every registered prediction format (``PREDICTION_FORMATS``): a folder written as
that format's producer writes it is detected, names its cases after the case ids, puts every map
on the label's voxels (the affine and the voxel order checked against nibabel and against
SimpleITK reading the label), gives probabilities that sum to 1 and equal the written ones,
names the file of a missing case, leaves extra cases out by name, and never loads a pickle.

Adding a format means adding its writer to ``WRITERS`` (a test fails until then)."""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from segcalib.data import Case, read_header, save_like
from segcalib.errors import DataError
from segcalib.export.writers import output_paths, write_probability_maps
from segcalib.predictions import PREDICTION_FORMATS, check_geometry, match_cases, open_predictions
from segcalib.predictions.layout import EXPORT_JSON, map_path
from segcalib.predictions.readers import read_nifti_map
from tests.predictions.nnunet_folders import CreatesFile, blob_label_zyx, nnunet_logits, softmax, write_like_nnunet, write_sitk

CASES = ("liver_000", "liver_001", "liver_002")
Writer = Callable[[Path, str, np.ndarray, Path], None]  # (folder, case id, probs (C, x, y, z) float64, label file)


def _write_segcalib(folder: Path, case_id: str, probs: np.ndarray, label: Path) -> None:
    variance = (probs * (1 - probs)).astype(np.float32)  # any per-class map: only its round trip matters
    write_probability_maps(probs.astype(np.float32), label, output_paths(folder, case_id, ("uncertainty", "variance")),
                           extras={"variance": variance})
    (folder / EXPORT_JSON).write_text(json.dumps({"status": "complete", "cases": list(CASES)}))


def _write_nifti(folder: Path, case_id: str, probs: np.ndarray, label: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_like(np.moveaxis(probs, 0, -1), label, folder / f"{case_id}.nii.gz", np.float32)


def _write_nnunet(folder: Path, case_id: str, probs: np.ndarray, label: Path) -> None:
    zyx = probs.transpose(0, 3, 2, 1)  # nibabel (C, x, y, z) -> nnU-Net / SimpleITK (C, z, y, x)
    write_like_nnunet(folder, case_id, zyx, label)  # writes a harmless <case>.pkl too; replaced below


WRITERS: dict[str, Writer] = {"segcalib": _write_segcalib, "nifti": _write_nifti, "nnunet": _write_nnunet}


def test_every_registered_format_has_a_writer_here() -> None:
    assert set(WRITERS) == set(PREDICTION_FORMATS), "add the new format's writer to WRITERS"


def test_the_command_line_format_choices_come_from_the_registry(monkeypatch) -> None:
    from segcalib.cli._args import prediction_formats

    monkeypatch.setitem(PREDICTION_FORMATS, "other", dataclasses.replace(PREDICTION_FORMATS["nifti"], name="other"))
    assert prediction_formats() == ("auto", "segcalib", "nifti", "nnunet", "other")


def _sitk_affine(path: Path) -> np.ndarray:
    """The RAS+ affine of ``path`` as SimpleITK reads it (LPS direction, spacing, origin)."""
    image = sitk.ReadImage(str(path))
    flip = np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = flip @ np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    affine[:3, 3] = flip @ np.array(image.GetOrigin())
    return affine


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> tuple[Path, dict[str, tuple[Path, np.ndarray]]]:
    """Labels written by SimpleITK (oblique, anisotropic, non-RAS) and the probabilities of each case
    in nibabel's voxel order, float64: ``{case: (label file, probs (C, x, y, z))}``."""
    root = tmp_path_factory.mktemp("labels")
    cases = {}
    for i, case_id in enumerate(CASES):
        label_zyx = blob_label_zyx(seed=i)
        label = write_sitk(root / f"{case_id}.nii.gz", label_zyx)
        probs_zyx = softmax(nnunet_logits(label_zyx, seed=10 + i))
        cases[case_id] = (label, probs_zyx.transpose(0, 3, 2, 1))
    return root, cases


@pytest.fixture(params=sorted(WRITERS))
def written(request, labelled, tmp_path) -> tuple[str, Path, dict[str, tuple[Path, np.ndarray]]]:
    """A folder of each format, with a ``<case>.pkl`` beside every case whose unpickling would
    create ``tmp_path / "ran"``."""
    name = request.param
    _, cases = labelled
    folder = tmp_path / name
    for case_id, (label, probs) in cases.items():
        WRITERS[name](folder, case_id, probs, label)
        with open(folder / f"{case_id}.pkl", "wb") as f:
            pickle.dump(CreatesFile(tmp_path / "ran"), f)
    return name, folder, cases


def test_detected_and_named_after_the_cases(written) -> None:
    name, folder, cases = written
    detected = open_predictions(folder)
    assert detected.format == name
    assert open_predictions(folder, format=name).case_ids() == detected.case_ids() == sorted(cases)
    for case_id, (_, probs) in cases.items():
        assert detected.class_count(case_id, expected=probs.shape[0]) == 3  # from the headers alone


def test_maps_lie_on_the_label_voxels_in_nibabel_and_simpleitk(written) -> None:
    _, folder, cases = written
    maps = open_predictions(folder)
    for case_id, (label, probs) in cases.items():
        pred = maps.read(case_id)
        check_geometry(pred, read_header(label), num_classes=3)
        nib_label = nib.load(str(label))
        np.testing.assert_allclose(pred.affine, nib_label.affine, atol=1e-4, rtol=0)
        np.testing.assert_allclose(pred.affine, _sitk_affine(label), atol=1e-4, rtol=0)
        np.testing.assert_allclose(pred.spacing, sitk.ReadImage(str(label)).GetSpacing(), atol=1e-6)
        truth = np.asarray(nib_label.dataobj)
        assert np.array_equal(truth, sitk.GetArrayFromImage(sitk.ReadImage(str(label))).transpose(2, 1, 0))
        assert np.array_equal(pred.values.argmax(0), truth)  # voxel for voxel, in both readers' order
        np.testing.assert_allclose(pred.values, probs, atol=1e-6, rtol=0)


def test_probabilities_sum_to_one(written) -> None:
    _, folder, cases = written
    maps = open_predictions(folder)
    for case_id in cases:
        pred = maps.read(case_id)
        assert pred.kind == "probs" and pred.values.dtype == np.float32 and pred.values.min() >= 0
        np.testing.assert_allclose(pred.values.sum(0, dtype=np.float64), 1.0, atol=1e-5, rtol=0)


def test_a_pickle_beside_the_maps_is_never_loaded(written, tmp_path: Path) -> None:
    _, folder, cases = written
    maps = open_predictions(folder)
    for case_id in cases:
        maps.read(case_id)
        maps.class_count(case_id)
    assert not (tmp_path / "ran").exists()


def test_a_missing_case_names_its_file_and_extra_cases_are_left_out_by_name(written, caplog) -> None:
    name, folder, cases = written
    maps = open_predictions(folder)
    label = next(iter(cases.values()))[0]
    wanted = [Case(c, (label,), label, "test") for c in ("liver_002", "liver_000")]
    with caplog.at_level(logging.INFO, logger="segcalib"):
        pairs = match_cases(maps, wanted)
    assert [(c.case_id, e.case_id) for c, e in pairs] == [("liver_002", "liver_002"), ("liver_000", "liver_000")]
    extra = maps.entry("liver_001").path
    assert "1 map(s) of cases not asked for are left out" in caplog.text and str(extra) in caplog.text
    missing = Case("liver_009", (label,), label, "test")
    with pytest.raises(DataError) as info:
        match_cases(maps, wanted + [missing])
    expected_name = {"segcalib": "liver_009_probs.nii.gz", "nifti": "liver_009.nii.gz", "nnunet": "liver_009.npz"}[name]
    message = str(info.value)
    assert message.startswith("case liver_009: no prediction map in ") and str(folder) in message
    assert f"looked for {expected_name}" in message


def test_variance_maps_round_trip_and_are_never_cases(labelled, tmp_path: Path) -> None:
    """``_variance`` (4D, per class) written by the exporter's writer is found again through the layout,
    bit for bit, and neither the segcalib nor the nifti reader takes it for a case."""
    _, cases = labelled
    folder = tmp_path / "export"
    for case_id, (label, probs) in cases.items():
        _write_segcalib(folder, case_id, probs, label)
    for format in ("segcalib", "nifti"):
        assert open_predictions(folder, format=format).case_ids() == sorted(cases)
    (folder / EXPORT_JSON).unlink()  # a copied export without its record: read as NIfTI maps
    assert open_predictions(folder).format == "nifti" and open_predictions(folder).case_ids() == sorted(cases)
    for case_id, (_, probs) in cases.items():
        path = map_path(folder, case_id, "variance")
        assert path.name == f"{case_id}_variance.nii.gz"
        values, _ = read_nifti_map(path)
        assert np.array_equal(values, (probs * (1 - probs)).astype(np.float32))


def test_evaluate_gives_the_same_numbers_whatever_the_format(labelled, tmp_path: Path) -> None:
    """The same probabilities written as each format evaluate to the same report (1e-6)."""
    from segcalib.reports import evaluate
    from tests.predictions.nnunet_folders import LABELS

    _, cases = labelled
    manifest = tmp_path / "dataset.json"
    entries = [{"image": str(label), "label": str(label), "case_id": c} for c, (label, _) in cases.items()]
    manifest.write_text(json.dumps({"labels": LABELS, "test": entries}))
    summaries = {}
    for name, writer in WRITERS.items():
        for case_id, (label, probs) in cases.items():
            writer(tmp_path / name, case_id, probs, label)
        report = evaluate(tmp_path / name, manifest, tmp_path / f"report_{name}", write_html=False, device="cpu")
        assert report["metadata"]["prediction_format"] == name and report["counts"]["cases"] == len(cases)
        summaries[name] = {k: v for k, v in report["summary"].items() if isinstance(v, float)}
    reference = summaries.pop("segcalib")
    assert {"ece_all", "nll", "brier", "dice_fg", "hd95"} <= set(reference)
    for name, summary in summaries.items():
        assert summary.keys() == reference.keys(), name
        for key, value in reference.items():
            assert summary[key] == pytest.approx(value, abs=1e-6, nan_ok=True), (name, key)
