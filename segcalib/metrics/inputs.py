"""Checked MONAI-style metric inputs: probabilities ``(B, C, *spatial)`` and integer labels
``(B, *spatial)`` or ``(B, 1, *spatial)``, turned into the flat per-case views the metrics share.

Every calibration measure in this package treats each voxel as a sample: top-label confidence
``max_k p_k`` with outcome ``[argmax_k p_k == y]`` (first maximum on ties, as ``torch.argmax``),
or class-wise ``p_k`` with outcome ``[y == k]``.
"""

from __future__ import annotations

import torch

from segcalib.utils.tensors import as_label_map

MODES = ("top", "classwise")
INCLUDE_BACKGROUND = True
"""The one ``include_background`` default of every metric in :mod:`segcalib.metrics` (as MONAI's
``DiceMetric`` and ``CalibrationErrorMetric``, and SPEC §3's CECE over all ``C`` classes); the
evaluation report asks for foreground classes explicitly where it wants them."""


def check_probs_target(
    probs: torch.Tensor, target: torch.Tensor, num_classes: int | None = None, check_values: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and return ``(probs, labels)``: probs unchanged, labels int64 ``(B, *spatial)``.

    Args:
        probs: floating ``(B, C, *spatial)`` probabilities (1 to 3 spatial axes).
        target: integer labels ``(B, *spatial)`` or ``(B, 1, *spatial)`` in ``0..C-1``.
        num_classes: expected ``C`` (``None``: any).
        check_values: check that labels lie in ``0..C-1`` and probabilities in ``[0, 1]``.
    """
    if not torch.is_tensor(probs) or not probs.is_floating_point():
        raise ValueError("probs must be a floating point tensor (B, C, *spatial)")
    if probs.dim() < 3:
        raise ValueError(f"probs must be (B, C, *spatial), got shape {tuple(probs.shape)}")
    if num_classes is not None and probs.shape[1] != num_classes:
        raise ValueError(f"probs has {probs.shape[1]} channels, expected num_classes={num_classes}")
    if not torch.is_tensor(target) or target.is_floating_point() or target.is_complex():
        raise ValueError(f"target must be an integer tensor, got {getattr(target, 'dtype', type(target))}")
    labels = as_label_map(target.to(probs.device), probs)
    if check_values and labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= probs.shape[1]:
            raise ValueError(f"target labels must lie in 0..{probs.shape[1] - 1}, got values in [{lo}, {hi}]")
        p_lo, p_hi = float(probs.min()), float(probs.max())
        if not (p_lo >= 0.0 and p_hi <= 1.0):
            raise ValueError(f"probs must lie in [0, 1], got values in [{p_lo}, {p_hi}]")
    return probs, labels


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def evaluated_classes(num_classes: int, include_background: bool) -> list[int]:
    """Class indices a class-wise measure averages over (``1..C-1`` without the background)."""
    if not include_background and num_classes < 2:
        raise ValueError("include_background=False needs at least 2 classes")
    return list(range(0 if include_background else 1, num_classes))


def case_samples(
    probs: torch.Tensor, labels: torch.Tensor, mode: str, classes: list[int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-case ``(scores, outcomes)`` float64 pairs.

    ``mode="top"``: scores ``(1, N)`` top-label confidence, outcomes ``(1, N)`` correctness.
    ``mode="classwise"``: scores ``(K, N)`` = ``p_k`` for the evaluated classes, outcomes
    ``[y == k]``. ``N`` is the number of voxels of the case.
    """
    b, c = probs.shape[:2]
    p = probs.reshape(b, c, -1)
    y = labels.reshape(b, -1)
    out = []
    for i in range(b):
        pi = p[i].double()
        if mode == "top":
            conf, pred = pi.max(0)
            out.append((conf.unsqueeze(0), (pred == y[i]).double().unsqueeze(0)))
        else:
            idx = torch.tensor(classes, device=p.device)
            out.append((pi.index_select(0, idx), (y[i].unsqueeze(0) == idx.view(-1, 1)).double()))
    return out


def prediction_labels(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer ``(B, *spatial)`` label maps of a prediction and a target.

    Args:
        pred: floating ``(B, C, *spatial)`` probabilities or one-hot (argmax over classes, first
            maximum on ties), or an integer label map ``(B, *spatial)`` / ``(B, 1, *spatial)``
            (a 4D or 5D integer map with a singleton dim 1 is read as having a channel axis, so a
            single-slice 3D integer map must be given as ``(B, 1, 1, H, W)``).
        target: integer labels ``(B, *spatial)`` or ``(B, 1, *spatial)``.
        num_classes: ``C``; labels must lie in ``0..C-1``.
    """
    if pred.is_floating_point():
        if pred.dim() < 3 or pred.shape[1] != num_classes:
            raise ValueError(f"floating pred must be (B, {num_classes}, *spatial), got shape {tuple(pred.shape)}")
        labels = pred.argmax(1)
    else:
        labels = pred[:, 0] if pred.dim() >= 4 and pred.shape[1] == 1 else pred
        labels = labels.long()
    if target.is_floating_point() or target.is_complex():
        raise ValueError(f"target must be an integer tensor, got {target.dtype}")
    truth = as_label_map(target.to(labels.device), labels.unsqueeze(1))
    for name, x in (("pred", labels), ("target", truth)):
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= num_classes):
            raise ValueError(f"{name} labels must lie in 0..{num_classes - 1}")
    return labels, truth
