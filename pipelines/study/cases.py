"""Which cases a calibrator is fitted and chosen on (the protocol), and streaming them from a run's exports.

Protocols (the test split is never among them):

- ``validation``: the 16 validation cases, k = 4 folds. The network never trained on them (they
  only chose its best checkpoint), so out-of-fold scores estimate calibration on unseen cases.
- ``nontest``: the 100 training + validation cases, k = 5 folds. Four times the data, but 84 of
  the cases are the network's own training cases, on which it is more confident *and* more often
  right than on unseen ones: calibrators fitted there under-correct, and scores there flatter
  over-fitted losses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch

from segcalib.data import load_manifest
from segcalib.data.manifest import Manifest
from segcalib.errors import ConfigError
from segcalib.export.posthoc import _fit_item
from segcalib.predictions import match_cases, open_predictions

PROTOCOLS = {"validation": ("validation",), "nontest": ("training", "validation")}
PROTOCOL_FOLDS = {"validation": 4, "nontest": 5}


def protocol_splits(protocol: str) -> tuple[str, ...]:
    """The manifest splits whose cases ``protocol`` fits and chooses calibrators on."""
    try:
        return PROTOCOLS[protocol]
    except KeyError:
        raise ConfigError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}") from None


def protocol_case_ids(manifest: Manifest, protocol: str) -> list[str]:
    """Ids of the labelled cases of ``protocol`` (never a test case: checked)."""
    ids = [c.case_id for split in protocol_splits(protocol) for c in manifest.labelled(split)]
    test = {c.case_id for c in manifest.cases("test")}
    leaked = sorted(test & set(ids))
    if leaked:
        raise ConfigError(f"{manifest.path}: test cases {leaked[:5]} are also in {protocol_splits(protocol)}")
    return ids


def export_folder(run_dir: Path, split: str) -> Path:
    """Where a run's maps (probabilities and logits, T = 1) of ``split`` are exported."""
    return Path(run_dir) / "exports" / split


def case_stream(run_dir: Path, manifest_path: Path, protocol: str, device: torch.device,
                split_seed: int) -> Callable[[], Iterator[tuple]]:
    """A callable yielding ``(case_id, logits (1, C, *S), target (1, *S), spacing, None)`` for every
    case of ``protocol``, read from the run's exports (what :func:`cross_validate` consumes)."""
    manifest = load_manifest(manifest_path, split_seed=split_seed)
    parts = []
    for split in protocol_splits(protocol):
        folder = open_predictions(export_folder(run_dir, split), format="segcalib", input="logits")
        parts.append((folder, [case for case, _ in match_cases(folder, manifest.labelled(split))]))

    def cases() -> Iterator[tuple]:
        for folder, chosen in parts:
            for case in chosen:
                yield _fit_item(folder, case, manifest.num_classes, device, False)

    return cases
