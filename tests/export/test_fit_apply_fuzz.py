"""Issue 21: random valid and invalid calibrator files and random prediction folders (formats, input
spaces, NaN, shapes, class counts, stray files) fed to ``segcalib calibrate fit`` / ``apply``.
Every run ends in exit 0 with finite maps that sum to 1 (or a loadable calibrator), or in exit 2
with the output folder as it was; never exit 1 (an exception out of ``main``)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from segcalib.calibrators import build_calibrator, load_calibrator, save_calibrator
from segcalib.cli import main
from tests.synthetic import make_dataset, write_nifti

SHAPE = (6, 5, 4)
CLASSES = 3
METHODS = ("temperature", "vector", "class_temperature", "dirichlet", "histogram_binning", "ensemble_temperature",
           "isotonic", "boundary_temperature")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A labelled manifest of two validation cases, and one fitted calibrator file per method."""
    root = tmp_path_factory.mktemp("fuzz")
    manifest = make_dataset(root / "data", n_cases=2, shape=SHAPE, splits={"validation": 2}, n_classes=CLASSES)
    documents = {}
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn((2, CLASSES, *SHAPE), generator=gen) * 3
    target = torch.randint(0, CLASSES, (2, *SHAPE), generator=gen)
    for method in METHODS:
        cal = build_calibrator(method, CLASSES)
        cal.update(logits, target)
        save_calibrator(cal.fit(), root / method, fitted_on="probs")
        documents[method] = json.loads((root / method / "calibrator.json").read_text())
    return {"manifest": manifest, "documents": documents}


def _listing(folder: Path) -> dict[str, bytes] | None:
    if not folder.exists():
        return None
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@st.composite
def folders(draw) -> dict:
    return {
        "format": draw(st.sampled_from(["segcalib", "nnunet", "nifti"])),
        "kind": draw(st.sampled_from(["probs", "logits"])),
        "flaw": draw(st.sampled_from(["none", "none", "none", "none", "nan", "shape", "classes", "stray", "mixed",
                                      "bad_json", "second_case_nan"])),
        "input": draw(st.sampled_from(["auto", "auto", "probs", "logits"])),
        "seed": draw(st.integers(0, 2**16)),
    }


@st.composite
def calibrator_documents(draw) -> dict:
    method = draw(st.sampled_from(METHODS))
    change = draw(st.sampled_from(["none", "none", "none", "param", "unknown_param", "classes", "method", "space",
                                   "no_space", "version"]))
    value = draw(st.sampled_from([1e-308, 1e-30, 1e30, 1e40, -1.0, 0.0, "x", None, [1, 2], 1.0]))
    space = draw(st.sampled_from(["logits", "log_probs", "probs", 3]))
    return {"method": method, "change": change, "value": value, "space": space}


def _write_folder(folder: Path, spec: dict) -> None:
    rng = np.random.default_rng(spec["seed"])
    for i in range(2):
        case = f"case_{i:03d}"
        values = rng.normal(size=(*SHAPE, CLASSES)).astype(np.float32) * 3
        if spec["kind"] == "probs":
            values = np.exp(values - values.max(-1, keepdims=True))
            values /= values.sum(-1, keepdims=True)
        if spec["flaw"] == "nan" or (spec["flaw"] == "second_case_nan" and i == 1):
            values[1, 1, 1, 0] = np.nan
        if spec["flaw"] == "shape":
            values = values[:-1]
        if spec["flaw"] == "classes":
            values = np.concatenate([values, values[..., :1]], axis=-1)
        if spec["format"] == "nnunet":
            folder.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(folder / f"{case}.npz", probabilities=np.moveaxis(values, -1, 0).transpose(0, 3, 2, 1))
            write_nifti(folder / f"{case}.nii.gz", np.zeros(values.shape[:3], dtype=np.uint8))
        else:
            suffix = f"_{spec['kind']}" if spec["format"] == "segcalib" else ""
            write_nifti(folder / f"{case}{suffix}.nii.gz", values)
    if spec["format"] == "segcalib":
        (folder / "export.json").write_text(json.dumps({"status": "complete"}))
    if spec["flaw"] == "stray":
        (folder / "notes.txt").write_text("unused")
        (folder / "case_000.pkl").write_bytes(b"\x80not a pickle")
    if spec["flaw"] == "bad_json":
        (folder / "dataset.json").write_text("{oops")
    if spec["flaw"] == "mixed":
        other = {"nnunet": "case_009.nii.gz", "nifti": "case_009.npz", "segcalib": "case_009.npz"}[spec["format"]]
        if other.endswith(".npz"):
            np.savez(folder / other, probabilities=np.full((CLASSES, *SHAPE[::-1]), 1 / CLASSES, np.float32))
        else:
            write_nifti(folder / other, np.full((*SHAPE, CLASSES), 1 / CLASSES, np.float32))


def _write_calibrator(folder: Path, documents: dict, spec: dict) -> None:
    document = json.loads(json.dumps(documents[spec["method"]]))
    key = next(k for k in ("temperature", "temperatures", "weight", "bin_values", "x", "s") if k in document["params"])
    if spec["change"] == "param":
        document["params"][key] = spec["value"]
    elif spec["change"] == "unknown_param":
        document["params"]["temprature"] = 1.0
    elif spec["change"] == "classes":
        document["classes"] = 4
    elif spec["change"] == "method":
        document["method"] = "vectr"
    elif spec["change"] == "space":
        document["input_space"] = {"space": spec["space"]}
    elif spec["change"] == "no_space":
        del document["input_space"]
    elif spec["change"] == "version":
        document["format_version"] = 7
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "calibrator.json").write_text(json.dumps(document))


def _check_maps(out: Path) -> None:
    maps = sorted(out.glob("*_probs.nii.gz"))
    assert len(maps) == 2
    for path in maps:
        probs = np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)
        assert np.isfinite(probs).all() and np.abs(probs.sum(-1) - 1).max() < 1e-4, path


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 40)), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(folder=folders(), calibrator=calibrator_documents(), verb=st.sampled_from(["apply", "apply", "fit"]),
       out_exists=st.booleans())
def test_fit_and_apply_exit_0_with_good_maps_or_2_with_the_folder_untouched(world, folder, calibrator, verb,
                                                                           out_exists) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _write_folder(root / "maps", folder)
        out = root / "out"
        if out_exists:
            out.mkdir()
            (out / "mine.txt").write_text("keep me")
        before = _listing(out)
        common = ["--predictions", str(root / "maps"), "--input", folder["input"], "--device", "cpu"]
        if verb == "apply":
            _write_calibrator(root / "cal", world["documents"], calibrator)
            argv = ["calibrate", "apply", "--calibrator", str(root / "cal"), *common, "--output", str(out)]
        else:
            argv = ["calibrate", "fit", *common, "--manifest", str(world["manifest"]), "--method",
                    calibrator["method"], "--output", str(out)]
        code = main(argv)  # an exception here is exit 1: a bug
        event(f"{verb} exit {code}")
        assert code in (0, 2)
        if code == 2:
            assert _listing(out) == before
        elif verb == "apply":
            _check_maps(out)
        else:
            assert load_calibrator(out).num_classes == CLASSES
