"""Reliability diagrams as PNG bytes (matplotlib, no display), for embedding in HTML reports."""

from __future__ import annotations

import base64
import io
import math
import textwrap
from dataclasses import dataclass
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLOURS = plt.get_cmap("tab10").colors


@dataclass
class Curve:
    """One reliability curve: per-bin mean confidence, observed accuracy/frequency, voxel count."""

    label: str
    confidence: Sequence[float]
    accuracy: Sequence[float]
    count: Sequence[float]


LEGEND_WIDTH = 44  # characters per legend line at fontsize 7 in a 4.2-inch axes


def reliability_png(curves: Sequence[Curve], title: str, n_bins: int = 15, with_histogram: bool = True) -> bytes:
    """A reliability diagram (observed vs predicted, with the diagonal) and a voxel histogram."""
    if with_histogram:
        fig, (ax, hist) = plt.subplots(2, 1, figsize=(4.2, 5.0), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    else:
        fig, ax = plt.subplots(figsize=(4.2, 3.8))
        hist = None
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect calibration")
    edges = [b / n_bins for b in range(n_bins + 1)]
    for i, curve in enumerate(curves):
        colour = COLOURS[i % len(COLOURS)]
        points = [
            (c, a) for c, a, n in zip(curve.confidence, curve.accuracy, curve.count) if n and not _nan(c) and not _nan(a)
        ]
        if points:
            xs, ys = zip(*points)
            label = textwrap.fill(curve.label, LEGEND_WIDTH)  # long run / variant names stay inside the axes
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.4, color=colour, label=label)
        if hist is not None:
            total = sum(curve.count) or 1
            fractions = [n / total for n in curve.count]
            hist.stairs(fractions, edges, color=colour, linewidth=1.2)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("observed frequency")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    if hist is not None:
        hist.set_yscale("log")
        hist.set_ylabel("voxels", fontsize=8)
        hist.set_xlabel("predicted probability")
        hist.grid(alpha=0.3)
    else:
        ax.set_xlabel("predicted probability")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _nan(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
