"""Dirichlet calibration (Kull et al., NeurIPS 2019): ``p = softmax(W log q + b)``, ``q = softmax(z)``."""

from __future__ import annotations

from segcalib.calibrators.matrix import MatrixScaling
from segcalib.calibrators.registry import register_calibrator


@register_calibrator("dirichlet")
class DirichletCalibration(MatrixScaling):
    """A full linear map of the log-probabilities, ODIR-regularised, fitted by float64 L-BFGS from
    ``W = I, b = 0`` (the identity calibration).

    Regulariser (Kull et al.'s normalised ODIR, off-diagonal and intercept):
    ``lambda_reg * mean_{i != j} W_ij^2 + mu_reg * mean_j b_j^2``; defaults 1e-4 (Fiducio: 0; the paper
    chooses both by cross-validation). Invariant to logit offsets by construction (``log softmax``).
    Preserves neither the argmax nor the class order. Probability inputs: pass ``log p``.

    Args:
        lambda_reg, mu_reg: ODIR weights. max_iter: L-BFGS iterations. seed, max_voxels: the voxel sample.
    """

    log_probs = True  # the map acts on log softmax(z); hyperparameters and fit as matrix scaling
