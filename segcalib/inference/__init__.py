"""Inference: sliding-window logits on GPU or CPU, trained-model loading, temperature scaling."""

from segcalib.inference.sliding_window import SlidingWindow, SliceWise, predict_logits, volume_network
from segcalib.inference.temperature import VoxelSample, apply_temperature, fit_temperature

__all__ = [
    "SliceWise",
    "SlidingWindow",
    "VoxelSample",
    "apply_temperature",
    "fit_temperature",
    "predict_logits",
    "volume_network",
]
