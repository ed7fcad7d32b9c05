"""Regenerate the hippocampus manifests in this folder from ``data/msd_hippocampus``.

The split is a seeded permutation of the 120 embedded MSD Task04 cases (seed 20261122), so that
it can be reproduced and audited: ``python data_manifests/make_hippocampus_manifests.py``.
- ``hippocampus_full.json``: all 120 cases, 84 training / 16 validation / 20 test (the study).
- ``hippocampus_demo.json``: 40 of them, 28 / 6 / 6 (``segcalib demo``).
- ``hippocampus_smoke.json``: 6 of the demo cases, 4 / 1 / 1 (``configs/smoke.yaml`` and tests).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "data" / "msd_hippocampus"
SEED = 20261122
SPLITS = {
    "hippocampus_full": (84, 16, 20),
    "hippocampus_demo": (28, 6, 6),
    "hippocampus_smoke": (4, 1, 1),
}


def _entry(case: str) -> dict[str, str]:
    return {
        "image": f"../data/msd_hippocampus/imagesTr/{case}.nii.gz",
        "label": f"../data/msd_hippocampus/labelsTr/{case}.nii.gz",
    }


def main() -> None:
    source = json.loads((DATA / "dataset.json").read_text())
    cases = sorted(Path(item["image"]).name.removesuffix(".nii.gz") for item in source["training"])
    order = cases[:]
    random.Random(SEED).shuffle(order)
    pools = {
        "hippocampus_full": order,
        "hippocampus_demo": order[:40],
        "hippocampus_smoke": order[:6],
    }
    for name, (n_train, n_val, n_test) in SPLITS.items():
        pool = pools[name]
        assert len(pool) == n_train + n_val + n_test
        manifest = {
            "name": "Hippocampus",
            "description": f"MSD Task04 hippocampus, {len(pool)} embedded cases, seeded split "
            f"(seed {SEED}, see make_hippocampus_manifests.py).",
            "reference": "Vanderbilt University Medical Center; Medical Segmentation Decathlon",
            "licence": "CC-BY-SA 4.0 (see data/msd_hippocampus/LICENSE.md)",
            "tensorImageSize": "3D",
            "modality": {"0": "MRI"},
            "labels": source["labels"],
            "training": [_entry(c) for c in sorted(pool[:n_train])],
            "validation": [_entry(c) for c in sorted(pool[n_train : n_train + n_val])],
            "test": [_entry(c) for c in sorted(pool[n_train + n_val :])],
        }
        (HERE / f"{name}.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main()
