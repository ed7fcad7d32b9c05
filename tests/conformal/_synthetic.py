"""Synthetic cases with a known distribution for the conformal tests and benchmark.

A case is a small volume with two ellipsoidal foreground classes; each class's logit is
``a · s + ε``, with ``s`` the signed distance in voxels to the class's surface (positive inside),
``a ~ U(0.4, 2)`` a per-case sharpness (some cases over-, some under-confident) and ``ε`` white
Gaussian noise (σ = 1.5); the background logit is 0. Class 2 is absent from 10% of the cases
(the absent-class convention is exercised), and its probabilities then carry only noise.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

SHAPE = (16, 16, 16)
SPACING = (1.0, 1.2, 1.5)


def synthetic_case(seed: int, shape: tuple[int, ...] = SHAPE, spacing: tuple[float, ...] = SPACING) -> tuple[np.ndarray, np.ndarray]:
    """``(probs float32 (3, *shape), label uint8 (*shape))`` of case ``seed``."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) * sp for s, sp in zip(shape, spacing)], indexing="ij"), -1)
    extent = np.array(shape) * np.array(spacing)
    label = np.zeros(shape, np.uint8)
    logits = np.zeros((3, *shape), np.float64)
    sharpness = rng.uniform(0.4, 2.0)
    for k in (1, 2):
        centre = rng.uniform(0.3, 0.7, 3) * extent
        radius = rng.uniform(0.12, 0.25, 3) * extent
        inside = (((grid - centre) / radius) ** 2).sum(-1) <= 1
        if k == 2 and rng.uniform() < 0.1:
            inside[:] = False
        label[inside & (label == 0)] = k
        signed = ndimage.distance_transform_edt(inside, spacing) - ndimage.distance_transform_edt(~inside, spacing)
        logits[k] = sharpness * signed + rng.normal(0, 1.5, shape)
    logits -= logits.max(0, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(0, keepdims=True)
    return probs.astype(np.float32), label
