"""The ensemble row: the seeds of one recipe averaged in probability space, each member calibrated
by its own calibrator first (``segcalib export`` with several runs applies one calibrator to all
members, so the members' calibrated test maps are averaged here)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from segcalib.export import EXPORT_JSON, output_paths
from segcalib.export.record import claim_output, finish, now, previous_record, versions
from segcalib.export.writers import ENSEMBLE_MAPS, all_written, write_probability_maps
from segcalib.inference.ensemble import ProbabilityEnsemble
from segcalib.predictions import open_predictions


def average_folders(members: Sequence[Path], output: Path) -> Path:
    """Write the mean of the members' probability maps (and the ensemble's uncertainty maps) per case
    into ``output``, with an ``export.json`` naming the members; complete cases are skipped."""
    folders = [open_predictions(m, format="segcalib", input="probs") for m in members]
    case_ids = folders[0].case_ids()
    first = dict(folders[0].metadata or {})
    settings = {
        **{k: first[k] for k in ("manifest", "split", "split_seed", "class_names", "boundary_mm") if k in first},
        "status": "running",
        "members": [str(Path(m).resolve()) for m in members],
        "combination": "mean of the members' calibrated probabilities",
        "temperature": None,
        "dtype": "float32",
        "started": now(),
        "versions": versions(),
    }
    claim_output(output, settings, previous_record(output), ("members", "split"))
    for case_id in case_ids:
        paths = output_paths(output, case_id, ENSEMBLE_MAPS)
        if all_written(paths):
            continue
        ensemble = ProbabilityEnsemble(dtype=torch.float32)
        for folder in folders:
            pred = folder.read(case_id)
            ensemble.add(torch.from_numpy(np.ascontiguousarray(pred.values)).unsqueeze(0))
            geometry = pred.geometry_file
        result = ensemble.result()
        extras = {name: getattr(result, name)[0].numpy() for name in ENSEMBLE_MAPS}
        write_probability_maps(result.mean[0].numpy(), geometry, paths, "float32", extras)
    finish(output, settings, case_ids)
    return output / EXPORT_JSON
