"""Matrix scaling (Guo et al., ICML 2017): ``p = softmax(W z + b)``, full ``W``, ODIR-regularised
(Kull et al., NeurIPS 2019); and its translation-invariant form (every row of ``W`` has the same sum)."""

from __future__ import annotations

from segcalib.calibrators._affine import AffineCalibrator
from segcalib.calibrators.registry import register_calibrator
from segcalib.inference.temperature import DEFAULT_MAX_VOXELS


@register_calibrator("matrix")
class MatrixScaling(AffineCalibrator):
    """``softmax(W z + b)``, ``W (C, C)`` from the identity, ``b (C,)`` from 0, float64 L-BFGS.

    Regulariser (normalised ODIR): ``lambda_reg * mean_{i != j} W_ij^2 + mu_reg * mean_j b_j^2``; the
    defaults (1e-4) are mild, since a segmentation sample has millions of voxels (Fiducio's default is 0).
    Preserves neither the argmax nor the class order. Not invariant to adding a constant to all logits.

    Args:
        lambda_reg, mu_reg: ODIR weights. max_iter: L-BFGS iterations. seed, max_voxels: the voxel sample.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        seed: int = 0,
        max_voxels: int = DEFAULT_MAX_VOXELS,
        lambda_reg: float = 1e-4,
        mu_reg: float = 1e-4,
        max_iter: int = 200,
    ) -> None:
        super().__init__(
            num_classes, seed=seed, max_voxels=max_voxels, lambda_reg=lambda_reg, mu_reg=mu_reg, max_iter=max_iter
        )


@register_calibrator("matrix_ti")
class TranslationInvariantMatrixScaling(MatrixScaling):
    """Matrix scaling with every row of ``W`` summing to one fitted value ``s``: ``g(z + c) = g(z)`` for
    any constant ``c`` added to all logits of a voxel (logits of different models differ by such
    offsets). Same ODIR regulariser and defaults as ``matrix``, on the constrained ``W``; preserves
    neither the argmax nor the class order."""

    translation_invariant = True
