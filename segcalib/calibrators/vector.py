"""Vector scaling (Guo et al., ICML 2017): ``p = softmax(w * z + b)``, one scale and one bias per class."""

from __future__ import annotations

from segcalib.calibrators._affine import AffineCalibrator
from segcalib.calibrators.registry import register_calibrator
from segcalib.inference.temperature import DEFAULT_MAX_VOXELS


@register_calibrator("vector")
class VectorScaling(AffineCalibrator):
    """``softmax(w * z + b)`` with ``w, b`` of shape ``(C,)``, fitted by float64 L-BFGS from ``w = 1, b = 0``.

    Does not preserve the argmax or the class order: unequal scales or biases can swap two classes
    (``w = (1, 3), z = (2, 1)`` gives ``(2, 3)``), even with every ``w_k > 0``. What ``w_k > 0`` does
    keep: raising ``z_k`` with the other logits fixed never lowers ``p_k``.

    Args:
        lambda_reg: weight of ``mean (w - 1)^2`` (0: none, as in Guo et al.).
        mu_reg: weight of ``mean b^2``.
        max_iter: L-BFGS iterations. ``seed``, ``max_voxels``: the voxel sample.
    """

    diagonal = True

    def __init__(
        self,
        num_classes: int,
        *,
        seed: int = 0,
        max_voxels: int = DEFAULT_MAX_VOXELS,
        lambda_reg: float = 0.0,
        mu_reg: float = 0.0,
        max_iter: int = 200,
    ) -> None:
        super().__init__(
            num_classes, seed=seed, max_voxels=max_voxels, lambda_reg=lambda_reg, mu_reg=mu_reg, max_iter=max_iter
        )
