"""Post-hoc calibrators of segmentation logits, created by name and fitted from a stream of volumes.

>>> from segcalib.calibrators import build_calibrator, save_calibrator, load_calibrator
>>> cal = build_calibrator("temperature", num_classes=3)
>>> for logits, target, mask in batches:          # (B, C, *spatial), (B, *spatial), (B, *spatial) bool
...     cal.update(logits, target, mask)            # bounded memory: a seeded, class-stratified sample
>>> probs = cal.fit().transform(logits)             # float32, sums to 1 over the class axis
>>> save_calibrator(cal, "cal_dir", extra={"region": "foreground"})

Every module of this package whose name does not start with ``_`` and is not one of the framework
modules below is imported here, so adding a calibrator is one new file with one
``@register_calibrator`` line.
"""

import importlib
import pkgutil

from segcalib.calibrators.base import Calibrator
from segcalib.calibrators.registry import (
    build_calibrator,
    calibrator_class,
    calibrator_parameters,
    list_calibrators,
    register_calibrator,
)
from segcalib.calibrators.sample import SampledCalibrator, StratifiedSample
from segcalib.calibrators.serialization import load_calibrator, read_calibrator_json, save_calibrator

_FRAMEWORK = {"base", "input_space", "registry", "sample", "serialization"}
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name not in _FRAMEWORK:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Calibrator",
    "SampledCalibrator",
    "StratifiedSample",
    "build_calibrator",
    "calibrator_class",
    "calibrator_parameters",
    "list_calibrators",
    "load_calibrator",
    "read_calibrator_json",
    "register_calibrator",
    "save_calibrator",
]
