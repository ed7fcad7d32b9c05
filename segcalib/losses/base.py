"""Base classes of every segcalib loss: input handling, float32 compute, components for logging."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from segcalib.losses._checks import check_int
from segcalib.losses._inputs import LossInputs


class CalibrationLoss(nn.Module):
    """A segmentation loss: ``loss(logits, target)`` -> scalar tensor.

    ``logits`` are ``(B, C, *spatial)`` (float32, float16 or bfloat16; half precision is computed
    in float32, with autocast disabled inside the loss), ``target`` is ``(B, *spatial)`` or
    ``(B, 1, *spatial)`` (int64 or integral float). Voxels equal to ``ignore_index`` drop out of every
    term; means run over the valid voxels, and a batch with no valid voxel gives 0 with zero gradient.

    After each forward, ``last_components`` holds detached 0-d tensors for logging: the task term
    (``ce``, ``dice``, ``focal``, ...) and, where the loss has one, ``penalty``, the regulariser as it
    enters the loss (``loss = task + weight * penalty``; each loss's docstring gives the weight).

    Subclasses implement :meth:`compute`.
    """

    loss_name: ClassVar[str] = ""

    def __init__(self, *, ignore_index: int = -100) -> None:
        super().__init__()
        self.ignore_index = check_int(self.name, "ignore_index", ignore_index)
        self.last_components: dict[str, Tensor] = {}

    @property
    def name(self) -> str:
        return self.loss_name or type(self).__name__

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        inputs = LossInputs(logits, target, self.ignore_index)
        with torch.autocast(device_type=inputs.source_logits.device.type, enabled=False):
            total, components = self.compute(inputs)
        self.last_components = {key: value.detach() for key, value in components.items()}
        return total

    def compute(self, inputs: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        """Return the scalar loss and its named parts (0-d tensors)."""
        raise NotImplementedError

    def logged_state(self) -> dict[str, float]:
        """Per-epoch state worth logging beside the loss (``{}``; adaptive losses add theirs)."""
        return {}

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}"


class AdaptiveLoss(CalibrationLoss):
    """A loss whose weights are updated between epochs from validation logits (and labels).

    The trainer calls ``accumulate(val_logits, val_target)`` for each validation batch (model in
    eval mode, no grad; CALS ignores the labels, CRaC's regions and targets come from them), then
    ``step()`` once per epoch. All state (multipliers, epoch counter, previous
    statistics) lives in buffers, so ``state_dict()`` / ``load_state_dict()`` restore it on resume.
    """

    def logged_state(self) -> dict[str, float]:
        """Each class's multiplier and penalty parameter: ``lambda_k`` and ``rho_k``."""
        row: dict[str, float] = {}
        for name in ("lambdas", "rhos"):
            values = getattr(self, name, None)
            if isinstance(values, Tensor):
                row.update({f"{name[:-1]}_{k}": float(v) for k, v in enumerate(values.detach().cpu().tolist())})
        return row

    def accumulate(self, val_logits: Tensor, val_target: Tensor | None = None) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError
