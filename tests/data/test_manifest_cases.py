"""Manifests of odd but valid datasets (external test sets, ACDC-style label names) and labelled
cases whose label is missing: errors name the case, ``allow_unlabelled`` makes them counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segcalib.cli import main
from segcalib.data import check_manifest, load_manifest
from segcalib.data.manifest import SPLITS, Case, Manifest
from segcalib.errors import DataError
from tests.synthetic import make_dataset


def _all_cases(m: Manifest) -> list[Case]:
    """Every case of every split."""
    return [c for split in SPLITS for c in m.cases(split)]


LABELS = {"0": "background", "1": "class1", "2": "class2"}


def _write(path: Path, content: dict) -> Path:
    path.write_text(json.dumps(content))
    return path


@pytest.mark.parametrize("split", ["test", "validation"])
def test_a_manifest_with_only_a_test_or_validation_list_is_accepted(tmp_path: Path, split: str) -> None:
    raw = {"labels": LABELS, split: [{"image": "i/a.nii.gz", "label": "l/a.nii.gz"}, "i/b.nii.gz" if split == "test"
                                    else {"image": "i/b.nii.gz", "label": "l/b.nii.gz"}]}
    path = _write(tmp_path / "external.json", raw)
    m = load_manifest(path)
    assert [c.case_id for c in m.cases(split)] == ["a", "b"]
    assert m.cases("training") == () and m.generated_splits == ()
    assert [c.case_id for c in m.labelled(split)] == ["a"] if split == "test" else ["a", "b"]
    with pytest.raises(DataError, match=r"external.json: the 'training' list is missing \(training needs"):
        load_manifest(path, require_training=True)
    _write(path, {**raw, "training": []})
    with pytest.raises(DataError, match="the 'training' list is empty"):
        load_manifest(path, require_training=True)


def test_external_test_set_passes_data_check(tmp_path: Path, capsys) -> None:
    make_dataset(tmp_path, n_cases=2, shape=(8, 8, 4))
    raw = json.loads((tmp_path / "dataset.json").read_text())
    path = _write(tmp_path / "test_only.json", {"labels": raw["labels"], "modality": raw["modality"],
                                                  "test": raw["training"]})
    assert main(["data", "check", str(path)]) == 0
    assert "cases:    training 0, validation 0, test 2\n" in capsys.readouterr().out


def _nnunet_v2(root: Path, cases: list[str], with_label: set[str]) -> Path:
    make_dataset(root / "src", n_cases=len(cases), shape=(8, 8, 4))
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i, case in enumerate(cases):
        (root / "src" / "imagesTr" / f"case_{i:03d}.nii.gz").rename(root / "imagesTr" / f"{case}_0000.nii.gz")
        if case in with_label:
            (root / "src" / "labelsTr" / f"case_{i:03d}.nii.gz").rename(root / "labelsTr" / f"{case}.nii.gz")
    return _write(root / "dataset.json", {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1, "b": 2},
                                          "file_ending": ".nii.gz"})


def test_nnunet_v2_training_case_without_label_is_an_error_naming_it(tmp_path: Path, capsys) -> None:
    path = _nnunet_v2(tmp_path, ["la_001", "la_002", "la_003"], with_label={"la_001", "la_003"})
    with pytest.raises(DataError) as info:
        load_manifest(path)
    message = str(info.value)
    assert "1 training/validation case(s) have no label: training[1] (case la_002: no label file" in message
    assert str(tmp_path / "labelsTr" / "la_002.nii.gz") in message and "--allow-unlabelled" in message

    assert main(["data", "check", str(path)]) == 2
    assert "case la_002" in capsys.readouterr().err
    assert main(["data", "check", str(path), "--allow-unlabelled"]) == 0
    out = capsys.readouterr().out
    assert "warning: 1 training/validation case(s) have no label and are left out" in out and "la_002" in out

    m = load_manifest(path, allow_unlabelled=True)
    assert m.unlabelled == (f"training[1] (case la_002: no label file {tmp_path / 'labelsTr' / 'la_002.nii.gz'})",)
    assert sorted(c.case_id for c in _all_cases(m) if c.label is not None) == ["la_001", "la_003"]
    assert sorted(c.case_id for c in _all_cases(m)) == ["la_001", "la_002", "la_003"]


def test_msd_entry_without_label_in_validation_is_an_error(tmp_path: Path) -> None:
    raw = {"labels": LABELS, "training": [{"image": "a.nii.gz", "label": "la.nii.gz"}],
           "validation": ["b.nii.gz", {"image": "c.nii.gz"}], "test": ["d.nii.gz"]}
    with pytest.raises(DataError, match=r"2 training/validation case\(s\) have no label: validation\[0\] \(case b: "
                       r"no 'label'\); validation\[1\] \(case c: no 'label'\)"):
        load_manifest(_write(tmp_path / "m.json", raw))
    assert len(load_manifest(tmp_path / "m.json", allow_unlabelled=True).unlabelled) == 2


@pytest.mark.parametrize(
    "image, label, expected",
    [
        ("patient001_frame01.nii.gz", "patient001_frame01_gt.nii.gz", "patient001_frame01"),  # ACDC
        ("la_003_0000.nii.gz", "la_003.nii.gz", "la_003"),  # nnU-Net: the _0000 rule stays
        ("scan_0000.nii.gz", "scan_0000.nii.gz", "scan_0000"),  # the label shares the suffix: a real name
        ("x_0000.nii.gz", "x_gt.nii.gz", "x"),
        ("img7.nii.gz", "seg7.nii.gz", "img7"),  # unrelated names: the image's
        ("case_12.nii.gz", "case_1_gt.nii.gz", "case_12"),  # a prefix only at a separator
        ("sub-01_T1w.nii.gz", "sub-01.nii.gz", "sub-01"),
    ],
)
def test_case_id_comes_from_the_image(tmp_path: Path, image: str, label: str, expected: str) -> None:
    raw = {"labels": LABELS, "training": [{"image": f"imagesTr/{image}", "label": f"labelsTr/{label}"}]}
    assert load_manifest(_write(tmp_path / "m.json", raw)).cases("training")[0].case_id == expected


@settings(max_examples=100, deadline=None)
@given(st.from_regex(r"[a-z][a-z0-9]{0,6}(_[a-z0-9]{1,4}){0,2}", fullmatch=True),
       st.sampled_from(["_gt", "_seg", "-label", ".mask", "", "_0000"]))
def test_label_suffix_never_reaches_the_case_id(stem: str, suffix: str) -> None:
    """ACDC-like pairs ``<stem>`` / ``<stem><suffix>``: the id is the image's stem, whatever the suffix."""
    raw = {"labels": LABELS, "training": [{"image": f"i/{stem}.nii.gz", "label": f"l/{stem}{suffix}.nii.gz"}]}
    path = Path("/nonexistent-folder/m.json")
    from segcalib.data.manifest import parse_manifest

    case = parse_manifest(raw, path).cases("training")[0]
    expected = stem[: -len("_0000")] if stem.endswith("_0000") and suffix != "" else stem
    assert case.case_id == expected


def test_duplicate_ids_name_both_entries(tmp_path: Path) -> None:
    raw = {"labels": LABELS, "training": [{"image": "a/x.nii.gz", "label": "a/x_gt.nii.gz"}],
           "test": ["t/y.nii.gz", "b/x.nii.gz"]}
    with pytest.raises(DataError) as info:
        load_manifest(_write(tmp_path / "m.json", raw))
    message = str(info.value)
    assert "case id 'x' appears twice: training[0] (image" in message and "a/x.nii.gz) and test[1] (image" in message
    assert "b/x.nii.gz" in message


def test_data_check_of_an_acdc_style_folder(tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path, n_cases=2, shape=(8, 8, 4), splits={"training": 1, "test": 1})
    raw = json.loads(manifest.read_text())
    for split in ("training", "test"):
        for entry in raw[split]:
            label = Path(tmp_path / entry["label"])
            renamed = label.with_name(label.name.replace(".nii.gz", "_gt.nii.gz"))
            label.rename(renamed)
            entry["label"] = str(renamed)
    summary = check_manifest(load_manifest(_write(manifest, raw)))
    assert sorted(r.case.case_id for r in summary.reports) == ["case_000", "case_001"]


def _grouped_raw(groups: list) -> dict:
    return {"labels": LABELS, "training": [
        {"image": f"imagesTr/p{i}.nii.gz", "label": f"labelsTr/p{i}.nii.gz", "group": g} for i, g in enumerate(groups)]}


@pytest.mark.parametrize("seed", range(5))
def test_groups_are_read_and_the_seeded_split_never_cuts_one(seed: int) -> None:
    from segcalib.data.manifest import parse_manifest

    groups = [f"patient{i // 2}" for i in range(20)] + [None, 7]  # two phases per patient, a lone case, an int
    m = parse_manifest(_grouped_raw(groups), Path("/data/m.json"), split_seed=seed)
    split_of = {c.case_id: split for split in SPLITS for c in m.cases(split)}
    group_of = {c.case_id: c.group for c in _all_cases(m)}
    assert group_of["p21"] == "7" and group_of["p20"] is None and group_of["p3"] == "patient1"
    for patient in {g for g in group_of.values() if g}:
        assert len({split_of[c] for c, g in group_of.items() if g == patient}) == 1, patient
    assert m.cases("test") and m.cases("validation") and m.generated_splits == ("test", "validation")


def test_without_groups_the_seeded_split_is_unchanged() -> None:
    from segcalib.data.manifest import parse_manifest

    plain = {"labels": LABELS, "training": [{"image": f"imagesTr/p{i}.nii.gz", "label": f"labelsTr/p{i}.nii.gz"}
                                            for i in range(22)]}
    m = parse_manifest(plain, Path("/data/m.json"), split_seed=3)
    # the split made before groups existed (same seed, same Random calls)
    import random

    pool = [f"p{i}" for i in range(22)]
    random.Random(3).shuffle(pool)
    n = round(0.2 * 22)  # SPLIT_FRACTION of the training cases for test, then for validation
    assert [c.case_id for c in m.cases("test")] == pool[:n]
    assert [c.case_id for c in m.cases("validation")] == pool[n : 2 * n]


@pytest.mark.parametrize("bad", ["", "  ", 1.5, [1], True])
def test_a_malformed_group_is_an_error_naming_the_entry(bad) -> None:
    from segcalib.data.manifest import parse_manifest

    with pytest.raises(DataError, match=r"training\[0\]\.group"):
        parse_manifest(_grouped_raw([bad]), Path("/data/m.json"))
