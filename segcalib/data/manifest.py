"""Data manifests: which cases exist, where their files are, which split they belong to.

A manifest is JSON in the Medical Segmentation Decathlon layout, so an MSD / nnU-Net v1
``dataset.json`` is a valid manifest as it is::

    {"name": "...", "labels": {"0": "background", "1": "Anterior"}, "modality": {"0": "MRI"},
     "training": [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}],
     "validation": [...], "test": [...]}

- Paths are relative to the manifest's folder (absolute paths allowed); ``image`` may be a list
  of channel files; ``test`` entries may be bare image paths (MSD) and then have no label.
- nnU-Net v2 ``dataset.json`` files (``channel_names``, ``labels`` as name -> value,
  ``file_ending``, no case list) are read by listing ``imagesTr`` / ``labelsTr`` / ``imagesTs``.
- nnU-Net's ignore label (a label named ``"ignore"``, whose value must exceed every class's, as
  nnU-Net requires) is not a class: it is :attr:`Manifest.ignore_label`, and its voxels are left
  out of calibrator fitting and of every metric. Region-based nnU-Net datasets
  (``regions_class_order``, labels given as lists of values) are refused: segcalib calibrates and
  evaluates softmax maps over classes, not one sigmoid map per region.
- ``validation`` / ``test``, when absent, are made from ``training`` by a seeded split
  (:data:`SPLIT_SEED`, :data:`SPLIT_FRACTION` each); an empty list means "no cases". Only
  training needs training cases (``require_training``): an external test set may be a
  manifest with a ``test`` list alone.
- ``training`` / ``validation`` cases need a label; one without (an nnU-Net v2 image whose
  ``labelsTr`` file is missing, an entry without ``label``) is an error naming the case, or,
  with ``allow_unlabelled``, a case recorded in :attr:`Manifest.unlabelled` and left out of
  training and evaluation.
- Case ids come from the (first) image file name, without nnU-Net's ``_0000`` channel suffix,
  so label files named otherwise (ACDC's ``patient001_frame01_gt.nii.gz``) do not rename cases.

Parsing checks structure only; :mod:`segcalib.data.check` opens the files.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segcalib.errors import DataError

SPLITS = ("training", "validation", "test")
SPLIT_SEED = 12345
SPLIT_FRACTION = 0.2
_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")
_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
_NNUNET_FIRST_CHANNEL = "_0000"
MAX_LISTED = 10
IGNORE_NAME = "ignore"  # nnU-Net v2's ignore label
REGION_KEY = "regions_class_order"  # nnU-Net v2's region-based training


@dataclass(frozen=True)
class Case:
    """One case: its id (safe to use in file names), channel files and optional label file."""

    case_id: str
    images: tuple[Path, ...]
    label: Path | None
    split: str
    group: str | None = None  # e.g. the patient of several scans: never split across folds or splits


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest. ``labels`` maps label value -> name (0 is the background)."""

    path: Path
    name: str
    labels: dict[int, str]
    channels: dict[int, str]
    splits: dict[str, tuple[Case, ...]]
    generated_splits: tuple[str, ...] = field(default=())
    unlabelled: tuple[str, ...] = field(default=())  # "training[2] (case x)": allowed without a label
    ignore_label: int | None = None  # nnU-Net's "ignore" value: its voxels count nowhere

    @property
    def num_classes(self) -> int:
        return max(self.labels) + 1

    @property
    def class_names(self) -> list[str]:
        return [self.labels.get(k, f"label_{k}") for k in range(self.num_classes)]

    @property
    def num_channels(self) -> int:
        return max(len(self.channels), 1)

    def cases(self, split: str) -> tuple[Case, ...]:
        if split not in self.splits:
            raise DataError(f"{self.path}: unknown split {split!r} (expected one of {', '.join(SPLITS)})")
        return self.splits[split]

    def labelled(self, split: str) -> tuple[Case, ...]:
        """The cases of ``split`` that have a ground-truth label, or a DataError if none has."""
        cases = self.cases(split)
        labelled = tuple(c for c in cases if c.label is not None)
        if not labelled:
            what = "no cases" if not cases else "no labelled cases"
            raise DataError(f"{self.path}: split {split!r} has {what}")
        return labelled


def load_manifest(
    path: str | Path,
    split_seed: int = SPLIT_SEED,
    require_training: bool = False,
    allow_unlabelled: bool = False,
) -> Manifest:
    """Parse and structurally validate a manifest; errors name the file and the entry.

    ``require_training``: an empty or missing ``training`` list is an error (training needs
    it; export and evaluate of an external test set do not). ``allow_unlabelled``: training /
    validation cases without a label are recorded in :attr:`Manifest.unlabelled` instead of
    being an error.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: manifest does not exist")
    if path.is_dir():
        candidate = path / "dataset.json"
        if not candidate.exists():
            raise DataError(f"{path}: is a folder without a dataset.json")
        path = candidate
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: manifest is not UTF-8 text ({exc.reason})") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    if not isinstance(raw, dict):
        raise DataError(f"{path}: a manifest must be a JSON object, got {type(raw).__name__}")
    return parse_manifest(raw, path, split_seed, require_training, allow_unlabelled)


def parse_manifest(
    raw: dict[str, Any],
    path: Path,
    split_seed: int = SPLIT_SEED,
    require_training: bool = False,
    allow_unlabelled: bool = False,
) -> Manifest:
    """Build a :class:`Manifest` from already-decoded JSON (``path`` locates relative files)."""
    root = path.parent
    refuse_regions(raw, path)
    labels = _parse_labels(raw.get("labels"), path)
    ignore_label = _pop_ignore_label(labels, path)
    channels = _parse_channels(raw.get("modality", raw.get("channel_names")), path)
    name = raw.get("name", path.stem)
    if not isinstance(name, str):
        raise DataError(f"{path}: 'name' must be a string")

    expected_labels: dict[str, str] = {}
    if not any(split in raw for split in SPLITS) and "file_ending" in raw:
        entries = _discover_nnunet_v2(raw, root, path, channels, expected_labels)
    else:
        entries = {split: raw[split] for split in SPLITS if split in raw}

    splits: dict[str, list[Case]] = {}
    for split, items in entries.items():
        if not isinstance(items, list):
            raise DataError(f"{path}: '{split}' must be a list of cases, got {type(items).__name__}")
        splits[split] = [_parse_case(item, split, index, root, path) for index, item in enumerate(items)]
    if require_training and not splits.get("training"):
        what = "is empty" if "training" in splits else "is missing"
        raise DataError(f"{path}: the 'training' list {what} (training needs labelled training cases)")
    if not any(splits.values()):
        raise DataError(f"{path}: no cases (the 'training', 'validation' and 'test' lists are missing or empty)")
    _check_unique_ids(splits, path)
    unlabelled = _unlabelled(splits, expected_labels)
    if unlabelled and not allow_unlabelled:
        shown = "; ".join(unlabelled[:MAX_LISTED])
        more = f"; ... and {len(unlabelled) - MAX_LISTED} more" if len(unlabelled) > MAX_LISTED else ""
        raise DataError(
            f"{path}: {len(unlabelled)} training/validation case(s) have no label: {shown}{more}; "
            "add the label files, or accept them with --allow-unlabelled (they are then left out)"
        )
    splits.setdefault("training", [])

    generated: list[str] = []
    rng = random.Random(split_seed)
    pool = list(splits["training"])
    rng.shuffle(pool)
    if any(c.group is not None for c in pool):
        pool = _group_order(pool, rng)
    for split in ("test", "validation"):
        if split in splits or not splits["training"]:
            splits.setdefault(split, [])
            continue
        n = max(1, round(SPLIT_FRACTION * len(splits["training"]))) if len(pool) > 2 else 0
        if n == 0 and split == "validation" and len(pool) > 1:
            n = 1
        n = _whole_groups(pool, n)
        taken, pool = pool[:n], pool[n:]
        splits[split] = [Case(c.case_id, c.images, c.label, split, c.group) for c in taken]
        generated.append(split)
    if generated:
        kept = {c.case_id for c in pool}
        splits["training"] = [c for c in splits["training"] if c.case_id in kept]

    return Manifest(
        path=path,
        name=name,
        labels=labels,
        channels=channels,
        splits={split: tuple(splits[split]) for split in SPLITS},
        generated_splits=tuple(generated),
        unlabelled=tuple(unlabelled),
        ignore_label=ignore_label,
    )


def _group_order(pool: list[Case], rng: random.Random) -> list[Case]:
    """``pool`` reordered so that the cases of one group are adjacent (groups in a seeded order; a case
    without a group is a group of its own)."""
    groups: dict[str, list[Case]] = {}
    for case in pool:
        groups.setdefault(case.group if case.group is not None else f"\0{case.case_id}", []).append(case)
    keys = sorted(groups)
    rng.shuffle(keys)
    return [case for key in keys for case in groups[key]]


def _whole_groups(pool: list[Case], n: int) -> int:
    """The smallest ``m >= n`` such that the first ``m`` cases of ``pool`` do not cut a group in two."""
    while 0 < n < len(pool) and pool[n].group is not None and pool[n].group == pool[n - 1].group:
        n += 1
    return n


def safe_case_id(text: str) -> str:
    """A file-name-safe id: no folders, no '..', only letters, digits, '.', '_' and '-'."""
    base = text.replace("\\", "/").rstrip("/").split("/")[-1]
    for suffix in _SUFFIXES:
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
            break
    base = _SAFE_ID.sub("_", base).lstrip(".")
    return base or "case"


# -- internals ---------------------------------------------------------------------------------


def _parse_labels(value: Any, path: Path) -> dict[int, str]:
    if not isinstance(value, dict) or not value:
        raise DataError(f"{path}: 'labels' must be a non-empty object such as {{\"0\": \"background\", \"1\": \"tumour\"}}")
    labels: dict[int, str] = {}
    keys_are_values = all(_is_int_like(k) for k in value)
    for key, item in value.items():
        if keys_are_values:  # MSD / nnU-Net v1: {"0": "background"}
            number, name = int(key), item
        elif _is_int_like(item) and not isinstance(item, bool):  # nnU-Net v2: {"background": 0}
            number, name = int(item), key
        else:
            raise DataError(f"{path}: label {key!r}: {item!r} is not a label value")
        if not isinstance(name, str):
            raise DataError(f"{path}: label {number} must have a name string, got {name!r}")
        if number < 0 or number > 255:
            raise DataError(f"{path}: label value {number} is outside 0..255")
        if number in labels:
            raise DataError(f"{path}: label value {number} is declared twice")
        labels[number] = name
    if 0 not in labels:
        raise DataError(f"{path}: 'labels' must declare the background value 0")
    return dict(sorted(labels.items()))


def refuse_regions(raw: dict[str, Any], path: Path) -> None:
    """A region-based nnU-Net dataset (``regions_class_order``, or labels given as lists of values) is
    refused with a DataError naming the key and ``path`` (exit 2)."""
    labels = raw.get("labels")
    lists = [k for k, v in labels.items() if isinstance(v, list)] if isinstance(labels, dict) else []
    if REGION_KEY in raw or lists:
        key = f"'{REGION_KEY}'" if REGION_KEY in raw else f"'labels' entry {lists[0]!r} (a list of values)"
        raise DataError(
            f"{path}: {key}: a region-based nnU-Net dataset (one sigmoid map per region, overlapping regions) is "
            "not supported; segcalib calibrates and evaluates softmax maps over mutually exclusive classes"
        )


def _pop_ignore_label(labels: dict[int, str], path: Path) -> int | None:
    """Remove nnU-Net's ``ignore`` label from ``labels`` and return its value (None when there is
    none); it must be larger than every class value, as nnU-Net requires."""
    ignore = [value for value, name in labels.items() if name == IGNORE_NAME]
    if not ignore:
        return None
    value = ignore[0]
    del labels[value]
    if not labels or value <= max(labels):
        raise DataError(f"{path}: label 'ignore' = {value} must be larger than every class value "
                        f"(largest: {max(labels, default=0)}), as nnU-Net requires")
    return value


def _parse_channels(value: Any, path: Path) -> dict[int, str]:
    if value is None:
        return {0: "image"}
    if not isinstance(value, dict) or not value or not all(_is_int_like(k) for k in value):
        raise DataError(f"{path}: 'modality' / 'channel_names' must be an object such as {{\"0\": \"MRI\"}}")
    return {int(k): str(v) for k, v in sorted(value.items(), key=lambda kv: int(kv[0]))}


def _is_int_like(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and value.strip().lstrip("-").isdigit()


def _resolve(entry: Any, root: Path, where: str, manifest: Path) -> Path:
    if not isinstance(entry, str) or not entry.strip():
        raise DataError(f"{manifest}: {where} must be a file path string, got {entry!r}")
    p = Path(entry).expanduser()
    return p if p.is_absolute() else (root / p)


def _parse_case(item: Any, split: str, index: int, root: Path, manifest: Path) -> Case:
    where = f"{split}[{index}]"
    if isinstance(item, str):  # MSD test entries are bare image paths
        images, label = (_resolve(item, root, where, manifest),), None
    elif isinstance(item, dict):
        unknown = set(item) - {"image", "label", "case_id", "id", "group"}
        if unknown:
            raise DataError(
                f"{manifest}: {where} has unknown key(s) {sorted(unknown)} (expected image, label, case_id, group)"
            )
        if "image" not in item:
            raise DataError(f"{manifest}: {where} has no 'image'")
        raw_images = item["image"]
        if isinstance(raw_images, list):
            if not raw_images:
                raise DataError(f"{manifest}: {where}: 'image' is an empty list")
            images = tuple(_resolve(x, root, f"{where}.image[{i}]", manifest) for i, x in enumerate(raw_images))
        else:
            images = (_resolve(raw_images, root, f"{where}.image", manifest),)
        label = _resolve(item["label"], root, f"{where}.label", manifest) if item.get("label") is not None else None
    else:
        raise DataError(f"{manifest}: {where} must be an object with 'image' (and 'label') or a path string")
    explicit = item.get("case_id", item.get("id")) if isinstance(item, dict) else None
    if explicit is not None:
        case_id = safe_case_id(str(explicit))
    else:
        case_id = _image_case_id(images[0], label)
    return Case(case_id=case_id, images=images, label=label, split=split, group=_parse_group(item, where, manifest))


def _parse_group(item: Any, where: str, manifest: Path) -> str | None:
    """The entry's ``group`` (a non-empty string or an integer, e.g. a patient id), or None."""
    value = item.get("group") if isinstance(item, dict) else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)) or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{manifest}: {where}.group must be a non-empty string or an integer, got {value!r}")
    return str(value)


def _image_case_id(image: Path, label: Path | None) -> str:
    """The id from the image's name, without nnU-Net's first-channel suffix ``_0000``; when
    one name extends the other at a separator (``a_t1`` / ``a``, ``p01`` / ``p01_gt``), the
    shorter, shared one."""
    case_id = safe_case_id(image.name)
    label_id = safe_case_id(label.name) if label is not None else None
    if case_id.endswith(_NNUNET_FIRST_CHANNEL) and label_id != case_id:
        case_id = case_id[: -len(_NNUNET_FIRST_CHANNEL)] or case_id
    if label_id is not None and label_id != case_id:
        short, long = sorted((case_id, label_id), key=len)
        if long.startswith(short) and long[len(short)] in "_.-":
            return short
    return case_id


def _check_unique_ids(splits: dict[str, list[Case]], manifest: Path) -> None:
    """Every case id once; a collision names both entries (split and index) and their images."""
    seen: dict[str, tuple[str, Case]] = {}
    for split in SPLITS:
        for index, case in enumerate(splits.get(split, [])):
            where = f"{split}[{index}]"
            if case.case_id in seen:
                first, other = seen[case.case_id]
                raise DataError(
                    f"{manifest}: case id {case.case_id!r} appears twice: {first} (image {other.images[0]}) and "
                    f"{where} (image {case.images[0]}); give one of them a 'case_id'"
                )
            seen[case.case_id] = (where, case)


def _unlabelled(splits: dict[str, list[Case]], expected_labels: dict[str, str]) -> list[str]:
    """``split[index] (case id ...)`` for each training / validation case without a label."""
    found = []
    for split in ("training", "validation"):
        for index, case in enumerate(splits.get(split, [])):
            if case.label is None:
                expected = expected_labels.get(case.case_id)
                detail = f"no label file {expected}" if expected else "no 'label'"
                found.append(f"{split}[{index}] (case {case.case_id}: {detail})")
    return found


def _discover_nnunet_v2(
    raw: dict[str, Any], root: Path, manifest: Path, channels: dict[int, str], expected_labels: dict[str, str]
) -> dict[str, list]:
    """Cases from ``imagesTr`` / ``imagesTs``; a missing label file goes to ``expected_labels``."""
    ending = raw["file_ending"]
    if not isinstance(ending, str):
        raise DataError(f"{manifest}: 'file_ending' must be a string")
    entries: dict[str, list] = {}
    for split, image_dir, label_dir in (("training", "imagesTr", "labelsTr"), ("test", "imagesTs", "labelsTs")):
        folder = root / image_dir
        if not folder.is_dir():
            continue
        ids = sorted({re.sub(r"_\d{4}$", "", p.name[: -len(ending)]) for p in folder.glob(f"*{ending}")})
        items = []
        for case in ids:
            images = [f"{image_dir}/{case}_{c:04d}{ending}" for c in sorted(channels)]
            label = root / label_dir / f"{case}{ending}"
            entry: dict[str, Any] = {"image": images, "case_id": case}
            if label.exists():
                entry["label"] = f"{label_dir}/{case}{ending}"
            else:
                expected_labels[case] = str(label)
            items.append(entry)
        entries[split] = items
    return entries
