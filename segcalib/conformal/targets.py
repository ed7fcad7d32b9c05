"""What one case contributes: its probabilities, and per target the probability map, the truth
and the predicted (argmax) mask.

Targets are the foreground classes ``1..C-1`` (named after the manifest's labels) and their
union ``foreground`` (probability ``1 - p_background``, truth ``label != 0``, prediction
``argmax != 0``). Fit and apply compute probabilities the same way (softmax of logits in
float32; probability maps as they are), so the masks apply exactly what was fitted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from segcalib.predictions import PredictionMap
from segcalib.spatial.regions import FOREGROUND

UNION = FOREGROUND  # the union of the foreground classes: the region of the same name


@dataclass(frozen=True)
class Target:
    """One target of a case: ``prob`` float32 ``(*spatial)``, ``pred`` boolean ``(*spatial)``."""

    name: str
    index: int | None  # the class, None for the union
    prob: np.ndarray
    pred: np.ndarray


def probabilities(pred: PredictionMap) -> np.ndarray:
    """float32 ``(C, *spatial)`` probabilities of a map (softmax over classes for logits)."""
    if pred.kind == "probs":
        return pred.values
    return torch.softmax(torch.from_numpy(pred.values), dim=0).numpy()


def target_names(class_names: list[str]) -> list[str]:
    """The foreground class names, then the union."""
    return [*class_names[1:], UNION]


def targets(probs: np.ndarray, class_names: list[str]) -> Iterator[Target]:
    """Every target of a case, in the order of :func:`target_names`."""
    argmax = probs.argmax(0)
    for k in range(1, probs.shape[0]):
        yield Target(class_names[k], k, probs[k], argmax == k)
    union = np.clip(np.float32(1.0) - probs[0], 0.0, 1.0)
    yield Target(UNION, None, union, argmax != 0)


def truth_of(label: np.ndarray, index: int | None) -> np.ndarray:
    """The true voxels of a target: ``label == k``, or ``label != 0`` for the union."""
    return label != 0 if index is None else label == index
