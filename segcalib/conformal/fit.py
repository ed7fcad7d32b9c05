"""``segcalib conformal fit``: stream the labelled cases of a prediction folder through the
per-case statistics, then choose each target's parameter with its guarantee.

Only sums over cases are kept (:class:`segcalib.conformal.statistics.RiskSums`): memory does
not grow with the number of cases. One case (its map, label and a few masks) is in memory at a
time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segcalib import __version__
from segcalib.conformal.control import check_level
from segcalib.conformal.grids import DEFAULT_RADIUS_MAX_MM, DEFAULT_RADIUS_STEP_MM, radius_grid, threshold_grid
from segcalib.conformal.record import CONFORMAL_JSON, build_record, write_record
from segcalib.conformal.statistics import RISKS, RiskSums, margin_counts, threshold_counts
from segcalib.conformal.targets import probabilities, target_names, targets, truth_of
from segcalib.data import read_volume
from segcalib.errors import ConfigError, DataError
from segcalib.predictions import check_geometry, open_predictions
from segcalib.predictions.matching import labelled_pairs, split_seed_of
from segcalib.utils.progress import progress_bar


@dataclass
class ConformalOptions:
    """What to control: ``risk`` (fnr, fdr, margin) at level ``alpha``; ``delta`` is the
    family-wise error of Learn-then-Test (fdr and the inner mask); ``inner_alpha`` adds the inner
    mask (fdr <= inner_alpha with probability 1 - delta)."""

    risk: str = "fnr"
    alpha: float = 0.1
    delta: float = 0.1
    inner_alpha: float | None = None
    split: str = "validation"
    split_seed: int | None = None
    margin_step_mm: float = DEFAULT_RADIUS_STEP_MM
    margin_max_mm: float = DEFAULT_RADIUS_MAX_MM
    format: str = "auto"
    channel_axis: str = "last"
    input: str = "auto"
    progress: bool = False

    def check(self) -> None:
        if self.risk not in RISKS:
            raise ConfigError(f"risk: {self.risk!r} is not one of {', '.join(RISKS)}")
        self.alpha = check_level("alpha", self.alpha)
        self.delta = check_level("delta", self.delta)
        if self.inner_alpha is not None:
            self.inner_alpha = check_level("inner alpha", self.inner_alpha)
        radius_grid(self.margin_step_mm, self.margin_max_mm)  # validates


class ConformalStatistics:
    """The sums over cases for every target: the main risk and, when asked, the inner fdr."""

    def __init__(self, names: list[str], risk: str, inner: bool, radii: np.ndarray):
        self.risk, self.radii, self.thresholds = risk, radii, threshold_grid()
        length = len(radii) if risk == "margin" else len(self.thresholds)
        self.main = {name: RiskSums(risk, length) for name in names}
        self.inner = {name: RiskSums("fdr", len(self.thresholds)) for name in names} if inner else None

    def add(self, case_id: str, probs: np.ndarray, label: np.ndarray, spacing: tuple[float, ...],
            class_names: list[str]) -> None:
        for target in targets(probs, class_names):
            truth = truth_of(label, target.index)
            needs_thresholds = self.risk != "margin" or self.inner is not None
            counts = threshold_counts(target.prob, truth, self.thresholds) if needs_thresholds else None
            if self.risk == "margin":
                self.main[target.name].add(case_id, margin_counts(target.pred, truth, spacing, self.radii))
            else:
                self.main[target.name].add(case_id, counts)
            if self.inner is not None:
                self.inner[target.name].add(case_id, counts)


def fit_conformal(predictions: str | Path, manifest_path: str | Path, output: str | Path,
                  options: ConformalOptions) -> dict[str, Any]:
    """Fit on the labelled ``options.split`` cases whose maps are in ``predictions``; write
    ``output/conformal.json`` and return it."""
    options.check()
    started = time.time()
    folder = open_predictions(predictions, format=options.format, channel_axis=options.channel_axis,
                              input=options.input)
    manifest, pairs = labelled_pairs(folder, manifest_path, options.split, options.split_seed,
                                     "calibrate on (conformal control needs the ground truth of every calibration case)")
    if manifest.ignore_label is not None:  # its voxels would count as misses or false alarms of the masks
        raise DataError(f"{manifest.path}: label 'ignore' = {manifest.ignore_label}: conformal fit does not support "
                        "nnU-Net's ignore label yet (a guaranteed mask needs every voxel's ground truth)")
    names = target_names(manifest.class_names)
    radii = radius_grid(options.margin_step_mm, options.margin_max_mm)
    stats = ConformalStatistics(names, options.risk, options.inner_alpha is not None, radii)
    bar = progress_bar(len(pairs), "conformal", options.progress)
    for case, _ in pairs:
        label, header = read_volume(case.label, dtype=np.int64)
        pred = folder.read(case.case_id)
        check_geometry(pred, header, manifest.num_classes)
        stats.add(case.case_id, probabilities(pred), label.reshape(pred.spatial_shape), pred.spacing, manifest.class_names)
        del pred, label
        bar.update(1)
    bar.close()
    record = build_record(stats, options, manifest.class_names)
    record.update(
        split=options.split,
        split_seed=split_seed_of(folder, options.split_seed),
        cases=[c.case_id for c, _ in pairs],
        predictions=str(Path(predictions).resolve()),
        prediction_format=folder.format,
        manifest=str(manifest.path.resolve()),
        seconds=round(time.time() - started, 3),
        time=time.strftime("%Y-%m-%dT%H:%M:%S"),
        versions={"segcalib": __version__},
    )
    write_record(Path(output) / CONFORMAL_JSON, record)
    return record
