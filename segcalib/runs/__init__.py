"""Run folders and checkpoints, below both training (which writes them) and inference (which
reads them): ``runs/<name>/config.yaml``, ``checkpoints/{last,best}.pt``, ``metrics.csv``."""

from segcalib.runs.checkpoint import load_checkpoint, restore_rng_state, save_checkpoint
from segcalib.runs.run_dir import RunDir, check_run_config, config_mismatch, open_run

__all__ = ["RunDir", "check_run_config", "config_mismatch", "load_checkpoint", "open_run", "restore_rng_state", "save_checkpoint"]
