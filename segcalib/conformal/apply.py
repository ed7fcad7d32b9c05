"""``segcalib conformal apply``: the guaranteed masks of every case of a prediction folder.

Per case, in the input's own geometry (the header of the file that placed the map), written
atomically:

- ``<case>_conformal.nii.gz``: uint8 4D, one 0/1 channel per target (the foreground classes,
  then their union ``foreground``; the order is ``channels`` in conformal.json). Channels, not
  one label map, because the guaranteed masks of neighbouring classes overlap where both
  thresholds are below 0.5.
- ``<case>_conformal_inner.nii.gz`` (when the fit has an inner mask): the same layout, each
  channel ``p_k >= t_inner`` (an fdr guarantee), so that inner ⊆ argmax ⊆ outer shows the band.

``masks.json`` records the conformal folder, the source and the cases.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from segcalib import __version__
from segcalib.conformal.record import read_record
from segcalib.conformal.statistics import signed_distance
from segcalib.conformal.targets import Target, probabilities, targets
from segcalib.data import save_like
from segcalib.errors import DataError
from segcalib.predictions import PredictionMap, open_predictions
from segcalib.utils.files import write_text_atomic, write_with
from segcalib.utils.progress import progress_bar

MASKS_JSON = "masks.json"


def output_files(output: Path, case_id: str, inner: bool) -> dict[str, Path]:
    files = {"outer": output / f"{case_id}_conformal.nii.gz"}
    if inner:
        files["inner"] = output / f"{case_id}_conformal_inner.nii.gz"
    return files


def target_mask(target: Target, row: dict[str, Any], risk: str, spacing: tuple[float, ...]) -> np.ndarray:
    """The mask of one target from its fitted row (``threshold`` or ``margin_mm``)."""
    if risk == "margin":
        r = row["margin_mm"]
        if r is None:
            return np.ones(target.prob.shape, dtype=bool)
        return signed_distance(target.pred, spacing) <= np.float64(r)
    if row["threshold"] is None:  # nothing certified: the empty mask
        return np.zeros(target.prob.shape, dtype=bool)
    return target.prob >= np.float64(row["threshold"])


def case_masks(pred: PredictionMap, record: dict[str, Any]) -> dict[str, np.ndarray]:
    """``{"outer": uint8 (*spatial, T), "inner": ...}`` for one case."""
    rows = {row["name"]: row for row in record["targets"]}
    outer, inner = [], []
    for target in targets(probabilities(pred), record["class_names"]):
        row = rows[target.name]
        outer.append(target_mask(target, row, record["risk"], pred.spacing))
        if "inner" in row:
            inner.append(target_mask(target, row["inner"], "fdr", pred.spacing))
    masks = {"outer": np.stack(outer, axis=-1).astype(np.uint8)}
    if inner:
        masks["inner"] = np.stack(inner, axis=-1).astype(np.uint8)
    return masks


def check_classes(pred: PredictionMap, record: dict[str, Any], conformal_dir: Path, metadata: dict) -> None:
    if pred.num_classes != record["num_classes"]:
        raise DataError(f"{pred.source}: {pred.num_classes} classes; the conformal fit {conformal_dir} was made on "
                        f"{record['num_classes']} ({', '.join(record['class_names'])})")
    names = metadata.get("class_names")
    if isinstance(names, list) and names and names != record["class_names"]:
        raise DataError(f"{pred.source}: classes {names} (from its export.json); the conformal fit {conformal_dir} "
                        f"was made on {record['class_names']}")


def apply_conformal(conformal_dir: str | Path, predictions: str | Path, output: str | Path, *, format: str = "auto",
                    channel_axis: str = "last", input: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Write the conformal masks of every case of ``predictions`` into ``output``."""
    conformal_dir, output = Path(conformal_dir), Path(output)
    if output.resolve() == Path(predictions).resolve():
        raise DataError(f"{output}: --output must differ from --predictions")
    record = read_record(conformal_dir)
    folder = open_predictions(predictions, format=format, channel_axis=channel_axis, input=input)
    has_inner = any("inner" in row for row in record["targets"])
    case_ids = folder.case_ids()
    output.mkdir(parents=True, exist_ok=True)
    bar = progress_bar(len(case_ids), "conformal", progress)
    for case_id in case_ids:
        pred = folder.read(case_id)
        check_classes(pred, record, conformal_dir, folder.metadata or {})
        masks = case_masks(pred, record)
        for kind, path in output_files(output, case_id, has_inner).items():
            array = masks[kind]
            write_with(path, lambda tmp, a=array: save_like(a, pred.geometry_file, tmp, np.uint8), suffix=".nii.gz")
        del pred, masks
        bar.update(1)
    bar.close()
    summary = {
        "status": "complete",
        "conformal": str(conformal_dir.resolve()),
        "source": str(folder.root.resolve()),
        "source_format": folder.format,
        "risk": record["risk"],
        "alpha": record["alpha"],
        "channels": record["channels"],
        "inner": has_inner,
        "cases": case_ids,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "versions": {"segcalib": __version__},
    }
    write_text_atomic(output / MASKS_JSON, json.dumps(summary, indent=1))
    return summary
