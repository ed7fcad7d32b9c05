"""Training: the loop, batches of patches, validation and logs; :func:`train` is the entry point
(run folders and checkpoints are :mod:`segcalib.runs`)."""

from __future__ import annotations

from segcalib.config.schema import ExperimentConfig
from segcalib.runs.run_dir import RunDir
from segcalib.training.trainer import Trainer, TrainingDiverged, TrainSummary


def train(cfg: ExperimentConfig, run_dir: RunDir, resume: bool = False, progress: bool = True) -> TrainSummary:
    """Train ``cfg`` into ``run_dir`` (``resume`` continues from ``checkpoints/last.pt``)."""
    return Trainer(cfg, run_dir, resume=resume, progress=progress).fit()


__all__ = ["Trainer", "TrainSummary", "TrainingDiverged", "train"]
