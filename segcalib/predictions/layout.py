"""The file names of a segcalib map folder (what ``segcalib export`` and ``calibrate apply`` write,
what the readers and ``evaluate`` look for): the one place they are spelled.

The folder's record is ``export.json``; one case ``<case>`` gives ``<case>_<map>.nii.gz`` for
each map it has:

- ``probs`` (4D, class last; float32, or uint16 with ``scl_slope``) and ``seg`` (uint8 argmax),
  always;
- ``logits`` (float32, class last), ``uncertainty`` (predictive entropy, nats), and for ensembles,
  TTA and MC dropout ``entropy``, ``mutual_info``, ``expected_entropy`` (nats) and ``variance``
  (per class, class last), when asked for.

:data:`VALUE_MAPS` are the maps a reader takes a case's values from (the role the suffix names);
every other name is a companion of a case, never a case of its own, even when it is 4D
(``_variance``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

EXPORT_JSON = "export.json"  # the folder's record: which model, calibrator and settings made the maps
MAP_ENDING = ".nii.gz"
VALUE_MAPS = ("probs", "logits")  # a case's values: probabilities or logits
ALWAYS_WRITTEN = ("probs", "seg")
ENSEMBLE_MAPS = ("entropy", "mutual_info", "expected_entropy")
OPTIONAL_MAPS = ("uncertainty", "logits", *ENSEMBLE_MAPS, "variance")
MAP_NAMES = (*ALWAYS_WRITTEN, *OPTIONAL_MAPS)


def map_path(folder: Path, case_id: str, name: str) -> Path:
    """``folder/<case_id>_<name>.nii.gz``; ``name`` one of :data:`MAP_NAMES` (ValueError otherwise)."""
    if name not in MAP_NAMES:
        raise ValueError(f"unknown map name {name!r}; known: {', '.join(MAP_NAMES)}")
    return Path(folder) / f"{case_id}_{name}{MAP_ENDING}"


def output_paths(output: Path, case_id: str, extra: Iterable[str] = ()) -> dict[str, Path]:
    """The files of one case: probs and seg, plus the ``extra`` maps (names from OPTIONAL_MAPS)."""
    names = [*ALWAYS_WRITTEN, *extra]
    unknown = [n for n in names[len(ALWAYS_WRITTEN):] if n not in OPTIONAL_MAPS]
    if unknown:
        raise ValueError(f"unknown map names {unknown}; known: {OPTIONAL_MAPS}")
    return {name: map_path(output, case_id, name) for name in names}


def split_map_name(stem: str) -> tuple[str, str | None]:
    """``("a", "probs")`` for the stem ``a_probs`` (a file name without its NIfTI ending);
    ``(stem, None)`` when it ends in no map name."""
    for name in sorted(MAP_NAMES, key=len, reverse=True):  # expected_entropy before entropy
        suffix = f"_{name}"
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)], name
    return stem, None


def has_value_maps(folder: Path) -> bool:
    """Whether ``folder`` holds at least one ``<case>_probs`` / ``<case>_logits`` map."""
    return any(next(Path(folder).glob(f"*_{name}{MAP_ENDING}"), None) is not None for name in VALUE_MAPS)
