"""Training: the loop, checkpoints, logs and run folders; :func:`train` is the entry point."""

from __future__ import annotations

from segcalib.config import ExperimentConfig
from segcalib.training.run_dir import RunDir, open_run
from segcalib.training.trainer import Trainer, TrainingDiverged, TrainSummary


def train(cfg: ExperimentConfig, run_dir: RunDir, resume: bool = False, progress: bool = True) -> TrainSummary:
    """Train ``cfg`` into ``run_dir`` (``resume`` continues from ``checkpoints/last.pt``)."""
    return Trainer(cfg, run_dir, resume=resume, progress=progress).fit()


__all__ = ["RunDir", "Trainer", "TrainSummary", "TrainingDiverged", "open_run", "train"]
