"""Manifest parsing: MSD / nnU-Net layouts, splits, case ids and structural errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from segcalib.data import load_manifest, safe_case_id
from segcalib.data.manifest import SPLITS, Case, Manifest
from segcalib.errors import DataError


def _all_cases(m: Manifest) -> list[Case]:
    """Every case of every split."""
    return [c for split in SPLITS for c in m.cases(split)]


def _write(path: Path, content: dict | str) -> Path:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


MSD = {
    "name": "Hippocampus",
    "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
    "modality": {"0": "MRI"},
    "training": [
        {"image": f"./imagesTr/hippocampus_{i:03d}.nii.gz", "label": f"./labelsTr/hippocampus_{i:03d}.nii.gz"}
        for i in range(10)
    ],
    "test": ["./imagesTs/hippocampus_100.nii.gz", "./imagesTs/hippocampus_101.nii.gz"],
}


def test_msd_dataset_json_as_is(tmp_path: Path) -> None:
    m = load_manifest(_write(tmp_path / "dataset.json", MSD))
    assert m.labels == {0: "background", 1: "Anterior", 2: "Posterior"}
    assert m.num_classes == 3 and m.num_channels == 1
    test = m.cases("test")
    assert [c.case_id for c in test] == ["hippocampus_100", "hippocampus_101"]
    assert all(c.label is None for c in test)
    assert test[0].images[0] == tmp_path / "imagesTs" / "hippocampus_100.nii.gz"
    # validation was missing: a seeded 20 % of training, disjoint from what remains
    assert m.generated_splits == ("validation",)
    assert len(m.cases("validation")) == 2 and len(m.cases("training")) == 8
    ids = {c.case_id for c in m.cases("validation")} | {c.case_id for c in m.cases("training")}
    assert len(ids) == 10


def test_seeded_split_is_reproducible_and_seed_dependent(tmp_path: Path) -> None:
    raw = dict(MSD)
    raw.pop("test")
    path = _write(tmp_path / "dataset.json", raw)
    a, b = load_manifest(path), load_manifest(path)
    assert [c.case_id for c in a.cases("test")] == [c.case_id for c in b.cases("test")]
    assert a.generated_splits == ("test", "validation")
    splits = {tuple(c.case_id for c in load_manifest(path, split_seed=s).cases("validation")) for s in range(6)}
    assert len(splits) > 1


def test_absolute_paths_and_multichannel_lists(tmp_path: Path) -> None:
    raw = {
        "labels": {"0": "bg", "1": "tumour"},
        "modality": {"0": "T1", "1": "FLAIR"},
        "training": [{"image": ["/data/a_t1.nii.gz", "b/a_flair.nii.gz"], "label": "/data/a.nii.gz"}],
        "validation": [],
        "test": [],
    }
    m = load_manifest(_write(tmp_path / "m.json", raw))
    (case,) = m.cases("training")
    assert case.images == (Path("/data/a_t1.nii.gz"), tmp_path / "b" / "a_flair.nii.gz")
    assert case.label == Path("/data/a.nii.gz") and case.case_id == "a"
    assert m.num_channels == 2 and m.cases("validation") == ()


def test_nnunet_v2_layout_is_discovered(tmp_path: Path) -> None:
    for name in ("la_003_0000.nii.gz", "la_004_0000.nii.gz"):
        (tmp_path / "imagesTr").mkdir(exist_ok=True)
        (tmp_path / "imagesTr" / name).write_bytes(b"")
    (tmp_path / "labelsTr").mkdir()
    (tmp_path / "labelsTr" / "la_003.nii.gz").write_bytes(b"")
    (tmp_path / "labelsTr" / "la_004.nii.gz").write_bytes(b"")
    raw = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "left atrium": 1}, "numTraining": 2,
           "file_ending": ".nii.gz"}
    m = load_manifest(_write(tmp_path / "dataset.json", raw))
    assert m.labels == {0: "background", 1: "left atrium"}
    ids = sorted(c.case_id for c in _all_cases(m))
    assert ids == ["la_003", "la_004"]
    assert all(c.label is not None and c.images[0].name.endswith("_0000.nii.gz") for c in _all_cases(m))


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "invalid JSON at line 1"),
        ({"labels": {"0": "bg"}, "training": []}, "no cases (the 'training', 'validation' and 'test' lists"),
        ({"labels": {"0": "bg"}}, "no cases"),
        ({"training": [{"image": "a.nii.gz"}]}, "'labels' must be"),
        ({"labels": {"1": "fg"}, "training": [{"image": "a.nii.gz"}]}, "background value 0"),
        ({"labels": {"0": "bg"}, "training": [{"label": "a.nii.gz"}]}, "training[0] has no 'image'"),
        ({"labels": {"0": "bg"}, "training": [{"image": "a.nii.gz", "lable": "x"}]}, "unknown key(s) ['lable']"),
        ({"labels": {"0": "bg"}, "training": [{"image": 3}]}, "training[0].image must be a file path"),
        ({"labels": {"0": "bg"}, "training": "a.nii.gz"}, "'training' must be a list"),
        ({"labels": {"0": "bg"}, "training": [{"image": "x/a.nii.gz", "label": "l/a.nii.gz"},
                                               {"image": "y/a.nii.gz", "label": "l/b.nii.gz"}]},
         "case id 'a' appears twice: training[0] (image"),
        ({"labels": {"0": "bg"}, "training": [{"image": "a.nii.gz", "label": "l/a.nii.gz"}]}, None),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_structural_errors_name_the_file(tmp_path: Path, content, message: str) -> None:
    path = _write(tmp_path / "bad.json", content if isinstance(content, str) else json.dumps(content))
    if message is None:  # the valid twin of the rows around it
        assert [c.case_id for c in load_manifest(path).cases("training")] == ["a"]
        return
    with pytest.raises(DataError) as info:
        load_manifest(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_manifest(tmp_path / "nope.json")


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("../../etc/passwd", "passwd"),
        ("labelsTr/case 1.nii.gz", "case_1"),
        ("..", "case"),
        (".hidden.nii", "hidden"),
        ("C:\\data\\x.mha", "x"),
    ],
)
def test_case_ids_cannot_escape_the_output_folder(raw: str, expected: str) -> None:
    assert safe_case_id(raw) == expected
