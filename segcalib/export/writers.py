"""Per-case map files in the input's own geometry, each written atomically.

The file names are those of :mod:`segcalib.predictions.layout` (the one owner of the map-folder
layout, which the readers and ``evaluate`` use too): ``probs`` (4D, class last; float32, or 16-bit:
NIfTI has no half-float type, so ``float16`` is stored as uint16 with ``scl_slope = 1/65535``,
which every reader turns back into floats in [0, 1] with a step of 1.5e-5), ``seg`` (uint8
argmax), and the optional maps (``uncertainty``, ``logits``, the ensemble maps, ``variance``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from segcalib.data import save_like
from segcalib.errors import DataError
from segcalib.predictions.layout import ENSEMBLE_MAPS, MAP_ENDING, OPTIONAL_MAPS, output_paths
from segcalib.utils.files import write_with

__all__ = ["ENSEMBLE_MAPS", "OPTIONAL_MAPS", "all_written", "check_dtype", "check_maps", "output_paths",
           "slabwise", "write_probability_maps"]
UINT16_MAX = 65535
DTYPES = ("float32", "float16")
SUM_TOL = 1e-4  # float32 softmax sums are within ~1e-6 of 1; beyond this the maps are wrong, not rounded


def all_written(paths: dict[str, Path]) -> bool:
    return all(p.exists() for p in paths.values())


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise DataError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    return dtype


def check_maps(maps: np.ndarray, what: str, producer: Callable[[], str] | None = None) -> None:
    """DataError unless ``maps (K, *spatial)`` are finite and sum to 1 over K within
    :data:`SUM_TOL`; the message names ``what`` (the case) and, when given, ``producer()`` (the
    calibration step and its parameters). Read slab by slab: no second volume."""
    off, bad = 0.0, 0  # largest |sum - 1|, count of non-finite values
    for i in range(0, maps.shape[-1], 16):
        slab = maps[..., i : i + 16]
        finite = np.isfinite(slab)
        bad += int(slab.size - np.count_nonzero(finite))
        sums = np.where(finite, slab, 0).sum(0, dtype=np.float64)
        if sums.size:
            off = max(off, float(np.abs(sums - 1.0).max()))
    if bad or off > SUM_TOL:
        problem = (f"{bad} NaN or infinite value(s)" if bad
                   else f"classes that sum to 1 only within {off:.3g} (> {SUM_TOL:g})")
        by = f", made by {producer()}" if producer is not None else ""
        raise DataError(f"{what}: the calibrated map has {problem}{by}; nothing was written for this case")


def write_probability_maps(
    maps: np.ndarray, reference: Path, paths: dict[str, Path], dtype: str = "float32", extras: dict | None = None,
    producer: Callable[[], str] | None = None,
) -> None:
    """Write ``maps (K, *spatial)`` (probabilities in ``reference``'s voxel order) as probs and seg,
    plus ``uncertainty`` (entropy of ``maps``) when asked and every array in ``extras``
    (``(*spatial)`` or ``(K, *spatial)``) under its path. ``maps`` may be a view; it is read slab
    by slab so that no second full volume is made. Nothing is written unless ``maps`` are finite
    and sum to 1 (:func:`check_maps`; ``producer`` names what made them)."""
    case = paths["probs"].name[: -len(f"_probs{MAP_ENDING}")]
    check_maps(maps, f"case {case}", producer)
    if dtype == "float16":
        quantised = slabwise(maps, lambda p: np.rint(np.moveaxis(p, 0, -1) * UINT16_MAX).astype(np.uint16), -2)
        _save(paths["probs"], quantised, reference, np.uint16, slope=1 / UINT16_MAX)
        del quantised
    else:
        _save(paths["probs"], np.moveaxis(maps, 0, -1), reference, np.float32)
    _save(paths["seg"], slabwise(maps, lambda p: p.argmax(0).astype(np.uint8)), reference, np.uint8)
    if "uncertainty" in paths:
        entropy = slabwise(maps, lambda p: -(p * np.log(np.clip(p, 1e-12, None))).sum(0, dtype=np.float32))
        _save(paths["uncertainty"], entropy, reference, np.float32)
    for name, array in (extras or {}).items():
        if name in paths:
            array = np.moveaxis(array, 0, -1) if array.ndim == maps.ndim else array
            _save(paths[name], array, reference, np.float32)


def slabwise(maps: np.ndarray, fn: Callable[[np.ndarray], np.ndarray], axis: int = -1, slab: int = 16) -> np.ndarray:
    """Apply ``fn`` to slabs of ``maps (K, *spatial)`` along the last spatial axis; concatenate."""
    n = maps.shape[-1]
    parts = [fn(maps[..., i : i + slab]) for i in range(0, n, slab)]
    return np.ascontiguousarray(np.concatenate(parts, axis=axis))


def _save(path: Path, array: np.ndarray, reference: Path, dtype, slope: float | None = None) -> None:
    write_with(path, lambda tmp: save_like(array, reference, tmp, dtype, slope=slope), suffix=MAP_ENDING)
