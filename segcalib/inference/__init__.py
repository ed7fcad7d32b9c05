"""Inference: sliding-window logits on GPU or CPU, trained-model loading, temperature scaling."""

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

_SLIDING_WINDOW_NAMES = ("SliceWise", "SlidingWindow", "predict_logits", "volume_network")


def __getattr__(name: str):
    # the sliding window needs MONAI (seconds to import); temperature scaling, which the calibrators
    # and `segcalib calibrate --help` use, must not pull it in, so it is imported on first use
    if name in _SLIDING_WINDOW_NAMES:
        from segcalib.inference import sliding_window

        return getattr(sliding_window, name)
    raise AttributeError(f"module 'segcalib.inference' has no attribute {name!r}")
