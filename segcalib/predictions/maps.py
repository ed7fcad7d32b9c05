"""One case's prediction as segcalib uses it, and what its values are (logits or probabilities).

Every reader returns a :class:`PredictionMap`: float32 values ``(C, *spatial)`` in the voxel
order nibabel gives the file that carries the geometry (the map itself, or nnU-Net's segmentation
beside its ``.npz``), with that file's ITK-consistent RAS+ affine (see
:mod:`segcalib.data.volumes`), so it lines up voxel for voxel with a label read by
:func:`segcalib.data.read_volume`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segcalib.errors import ConfigError, DataError

INPUTS = ("auto", "probs", "logits")
KINDS = ("probs", "logits")
PROB_TOL = 1e-3  # probabilities: every value >= -tol and every voxel's class sum within tol of 1


@dataclass(frozen=True)
class PredictionMap:
    """One case's map.

    Attributes:
        values: float32 ``(C, *spatial)``, C-contiguous, in the geometry file's nibabel voxel order.
        kind: ``"probs"`` (non-negative, sums to 1 over classes) or ``"logits"``.
        affine: ``(4, 4)`` voxel index -> RAS+ mm, ITK-consistent (spacing from ``pixdim``).
        source: the file the values were read from.
        geometry_file: the file whose header gave ``affine`` (``source`` except for nnU-Net).
    """

    values: np.ndarray
    kind: str
    affine: np.ndarray
    source: Path
    geometry_file: Path

    @property
    def num_classes(self) -> int:
        return int(self.values.shape[0])

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.values.shape[1:])

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along the spatial axes of ``values``."""
        ndim = len(self.spatial_shape)
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :ndim], axis=0))


def check_input(value: str) -> str:
    """Validate the ``input`` option (``auto``, ``probs`` or ``logits``)."""
    if value not in INPUTS:
        raise ConfigError(f"input: {value!r} is not one of {', '.join(INPUTS)}")
    return value


def probability_error(values: np.ndarray) -> float:
    """How far ``values (C, *spatial)`` are from probabilities: the largest of ``-min`` and
    ``max |sum_c - 1|`` over voxels (0 for exact probabilities)."""
    if values.size == 0:
        return 0.0
    total = values.sum(axis=0, dtype=np.float64)
    off_sum = float(np.abs(total - 1.0).max())
    return max(off_sum, -float(values.min()))


def is_probabilities(values: np.ndarray, tol: float = PROB_TOL) -> bool:
    """True when every value is >= ``-tol`` and every voxel's classes sum to 1 within ``tol``."""
    return probability_error(values) <= tol


def resolve_kind(values: np.ndarray, requested: str, hint: str | None, path: Path, case_id: str | None = None) -> str:
    """Decide whether ``values`` are logits or probabilities, and check them.

    ``requested`` is the user's ``input`` option; ``hint`` what the file name or format declares
    (``_probs``, ``_logits``, nnU-Net's ``probabilities``), or ``None``. Values that are
    probabilities (>= 0 and summing to 1 over classes, within :data:`PROB_TOL`) are probabilities
    whatever the name says; ``input=logits`` on them is a :class:`DataError` naming the case (read
    as logits they would give flat maps and a meaningless fit). Forced or declared probabilities
    that are not probabilities are a DataError too; otherwise the values are logits. Non-finite
    values are always an error.
    """
    if not all(np.isfinite(values[c]).all() for c in range(values.shape[0])):
        raise DataError(f"{path}: holds NaN or infinite values")
    error = probability_error(values)
    if error <= PROB_TOL:
        if requested == "logits":
            case = f"case {case_id}: " if case_id else ""
            raise DataError(
                f"{case}{path}: input=logits, but the values are probabilities (>= 0 and summing to 1 over classes "
                f"within {PROB_TOL:g}); read as logits they would give flattened maps. Drop --input logits"
            )
        return "probs"
    claimed = requested if requested != "auto" else hint
    if claimed == "probs":
        why = "the option input=probs" if requested == "probs" else "its name or format"
        raise DataError(
            f"{path}: values are not probabilities (negative or not summing to 1 over classes, off by "
            f"{error:.3g} > {PROB_TOL:g}), yet {why} says they are; pass input=logits if they are logits "
            "(sigmoid / region-based maps are not supported)"
        )
    return "logits"
