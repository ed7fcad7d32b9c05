"""Test-time augmentation by flips and Monte Carlo dropout: members for a streaming ensemble.

:func:`member_predictions` yields one member's probabilities at a time (a flip of the input whose
output is flipped back, a dropout pass, or both), so that
:class:`~segcalib.inference.ensemble.ProbabilityEnsemble` combines them without holding them all:

.. code-block:: python

    predict = lambda x: predict_logits(net, x, window)
    ensemble = ProbabilityEnsemble()
    for probs in member_predictions(predict, image, tta=True, mc_samples=8, model=net):
        ensemble.add(probs)

References: Wang et al., "Aleatoric uncertainty estimation with test-time augmentation for medical
image segmentation with convolutional neural networks", Neurocomputing 2019; Gal & Ghahramani,
"Dropout as a Bayesian Approximation", ICML 2016.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from segcalib.errors import ConfigError

DROPOUT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


@dataclass(frozen=True)
class Flip:
    """A flip of the spatial axes ``axes`` (0-based, in ``(B, C, *spatial)`` order after B and C).

    A flip is its own inverse: :meth:`apply` it to the input, :meth:`undo` it on the output.
    """

    axes: tuple[int, ...] = ()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, C, *spatial)`` flipped along ``axes`` (the identity returns ``x`` itself)."""
        return x.flip([a + 2 for a in self.axes]) if self.axes else x

    undo = apply

    @property
    def name(self) -> str:
        return "identity" if not self.axes else "flip" + "".join(str(a) for a in self.axes)


def flip_transforms(spatial_dims: int, axes: Sequence[int] | None = None) -> list[Flip]:
    """All ``2^k`` flip combinations of ``axes`` (default: every spatial axis), identity first.

    Args:
        spatial_dims: number of spatial axes of the input (2 or 3).
        axes: which spatial axes (0-based) may be flipped, e.g. ``(1, 2)`` to keep the slice axis
            of an anisotropic volume.
    """
    if spatial_dims < 1:
        raise ConfigError(f"spatial_dims must be >= 1, got {spatial_dims}")
    axes = tuple(range(spatial_dims)) if axes is None else tuple(int(a) for a in axes)
    if len(set(axes)) != len(axes) or any(not 0 <= a < spatial_dims for a in axes):
        raise ConfigError(f"flip axes must be distinct spatial axes in 0..{spatial_dims - 1}, got {axes}")
    return [Flip(combo) for k in range(len(axes) + 1) for combo in itertools.combinations(sorted(axes), k)]


def active_dropout_layers(model: nn.Module, owner: str = "") -> list[nn.Module]:
    """The dropout layers of ``model`` with ``p > 0`` (modes untouched); a ConfigError when there
    is none (``owner`` names the model's source, e.g. its run folder), so that an export can refuse
    ``--mc-dropout`` before it writes anything."""
    layers = [m for m in model.modules() if isinstance(m, DROPOUT_TYPES)]
    active = [m for m in layers if float(m.p) > 0]
    if not active:
        found = f"its {len(layers)} dropout layers all have p=0" if layers else "it has no dropout layer"
        where = f"{owner}: " if owner else ""
        raise ConfigError(
            f"{where}MC dropout needs a model trained with dropout, but {type(model).__name__} has none active "
            f"({found}); set the model's dropout > 0 when training, or use an ensemble or test-time augmentation"
        )
    return active


def enable_mc_dropout(model: nn.Module) -> list[nn.Module]:
    """Put ``model`` in eval mode except its dropout layers, which sample again (MC dropout).

    Normalisation layers stay in eval mode (running statistics, not the batch's). Returns the
    dropout layers switched on. Raises :class:`~segcalib.errors.ConfigError` when the model has no
    dropout layer with ``p > 0``: its passes would all be the same and MC dropout would report
    zero uncertainty.
    """
    active = active_dropout_layers(model)
    model.eval()
    for m in active:
        m.train()
    return active


@contextlib.contextmanager
def mc_dropout(model: nn.Module) -> Iterator[list[nn.Module]]:
    """:func:`enable_mc_dropout` for the duration of a ``with`` block, then restore every module's mode."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield enable_mc_dropout(model)
    finally:
        for m, training in modes.items():
            m.train(training)


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=1)


def member_predictions(
    predict_fn: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    tta: bool | Sequence[Flip] = False,
    mc_samples: int = 1,
    model: nn.Module | None = None,
    to_probs: Callable[[torch.Tensor], torch.Tensor] = _softmax,
) -> Iterator[torch.Tensor]:
    """Yield one member's probabilities ``(B, K, *spatial)`` at a time, in the input's orientation.

    Members: ``mc_samples`` dropout passes × the flips (``mc_samples * len(flips)`` in all).

    Args:
        predict_fn: ``image (B, C, *spatial) -> logits (B, K, *spatial)``, e.g.
            ``lambda x: predict_logits(net, x, window)``.
        image: the input ``(B, C, *spatial)``.
        tta: ``False`` (no flips), ``True`` (all flips of every spatial axis, see
            :func:`flip_transforms`) or the flips to use.
        mc_samples: dropout passes; above 1 needs ``model``, whose dropout layers are switched on
            for the passes (:func:`mc_dropout`) and restored afterwards. Masks come from torch's
            global RNG: seed it (``torch.manual_seed``) for repeatable members.
        model: the network that ``predict_fn`` runs (only for MC dropout).
        to_probs: logits -> probabilities of this member (default softmax over dim 1; pass a
            temperature or calibrator here so that each member is calibrated before averaging).
    """
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise ConfigError(f"mc_samples must be an integer >= 1, got {mc_samples!r}")
    if mc_samples > 1 and model is None:
        raise ConfigError("mc_samples > 1 needs the model, to switch its dropout layers on")
    if tta is True:
        flips = flip_transforms(image.dim() - 2)
    elif tta is False:
        flips = [Flip()]
    else:
        flips = list(tta)
        if not flips:
            raise ConfigError("tta: the list of flips is empty")
    context = mc_dropout(model) if mc_samples > 1 else contextlib.nullcontext()
    with context:
        for _ in range(mc_samples):
            for flip in flips:
                yield flip.undo(to_probs(predict_fn(flip.apply(image))))
