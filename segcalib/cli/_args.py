"""Argument types that refuse bad numbers at the command line (argparse: exit 2, one message)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Callable


class LazyChoices(Sequence[str]):
    """argparse ``choices`` read from a registry only when needed (a value to check, a ``--help``
    to print): building the parser then imports no registry. Give the argument a ``metavar`` so
    that usage lines do not list them."""

    def __init__(self, load: Callable[[], Sequence[str]]) -> None:
        self._load = load
        self._values: list[str] | None = None

    def _get(self) -> list[str]:
        if self._values is None:
            self._values = list(self._load())
        return self._values

    def __contains__(self, value: object) -> bool:
        return value in self._get()

    def __iter__(self):
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())

    def __getitem__(self, index):  # type: ignore[override]
        return self._get()[index]


def prediction_formats() -> tuple[str, ...]:
    """``auto`` and every registered prediction format (read when a value is checked)."""
    from segcalib.predictions import PREDICTION_FORMATS

    return ("auto", *PREDICTION_FORMATS)


def prediction_inputs() -> tuple[str, ...]:
    from segcalib.predictions import INPUTS

    return INPUTS


def prediction_folder_args(parser: argparse.ArgumentParser) -> None:
    """``--predictions``, ``--format``, ``--channel-axis``, ``--input``: how every command reads a folder
    of another model's maps (:func:`segcalib.predictions.open_predictions`)."""
    parser.add_argument("--predictions", required=True,
                        help="a segcalib export folder, an nnU-Net --save_probabilities folder or 4D NIfTI maps")
    parser.add_argument("--format", default="auto", choices=LazyChoices(prediction_formats), metavar="FORMAT",
                        help="folder format: auto (default: detected from the content) or a registered one: "
                             "segcalib, nnunet, nifti (segcalib.predictions.PREDICTION_FORMATS)")
    parser.add_argument("--channel-axis", default="last", choices=("last", "first"), help="class axis of 4D NIfTI maps")
    parser.add_argument("--input", default="auto", choices=LazyChoices(prediction_inputs), metavar="INPUT",
                        help="probs or logits (default auto: probabilities when the values sum to 1)")


def region_names() -> list[str]:
    from segcalib.spatial.regions import available_regions

    return available_regions()


def bounded(kind: type, low: float | None = None, high: float | None = None,
            low_open: bool = False) -> Callable[[str], int | float]:
    """An argparse ``type`` parsing ``kind`` (int or float) that must be finite and within
    ``[low, high]`` (``(low, high]`` when ``low_open``); otherwise argparse's usage error."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} must be a finite number")
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high):
            left = f"({low:g}" if low_open else f"[{low:g}" if low is not None else "(-inf"
            right = f"{high:g}]" if high is not None else "inf)"
            raise argparse.ArgumentTypeError(f"{text!r} is outside {left}, {right}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in "invalid <name> value" messages
    return parse


def positive_mm(text: str) -> float:
    """A finite length in mm, > 0."""
    return bounded(float, low=0.0, low_open=True)(text)


def bin_count(text: str) -> int:
    """A number of reliability bins, 1..MAX_BINS (the metric's own bound)."""
    from segcalib.metrics.calibration_functional import MAX_BINS

    return bounded(int, low=1, high=MAX_BINS)(text)
