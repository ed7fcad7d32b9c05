"""One case at a glance: sagittal, coronal and axial slices through the ground truth, as a PNG.

Per plane (rows) the panels (columns) are the image with the ground-truth and predicted outlines,
the foreground probability over the image and, when given, an uncertainty map over the image.
The slices are the ones holding the most ground-truth foreground (all foreground classes
together; the predicted foreground when the ground truth is empty), shown in a fixed, labelled orientation (:mod:`segcalib.reports.slice_layout`) with
square millimetres, so that anisotropic voxels keep their true shape.

The pixels are composed in numpy (matplotlib's colour maps and font), so a case takes a few tens
of milliseconds; the PNG is palette-quantised to stay small enough for a report of hundreds
of cases. :func:`case_views_html` lays the cases out worst Dice first.
"""

from __future__ import annotations

import html
import io
import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from functools import lru_cache

import matplotlib
import numpy as np
from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from segcalib.errors import DataError
from segcalib.reports.figures import data_uri
from segcalib.reports.slice_layout import (
    PLANES,
    PlaneView,
    busiest_slices,
    display_size,
    plane_views,
    resample,
    scale_bar_mm,
    slice_extent_mm,
)

GT_COLOUR = (0, 230, 255)  # cyan: ground-truth outline, just outside the true mask
PRED_COLOUR = (255, 40, 200)  # magenta: predicted outline, just inside the predicted mask
OUTER_COLOUR = (255, 170, 0)  # orange: the conformal outer mask (its guaranteed coverage), just inside it
INNER_COLOUR = (60, 200, 60)  # green: the conformal inner mask (its precision guarantee), just inside it
PROB_CMAP = "inferno"
UNCERTAINTY_CMAP = "viridis"
WINDOW_PERCENTILES = (0.5, 99.5)
_MARGIN = 11  # pixels around each slice for the orientation letters
_GAP = 6  # pixels between columns, so that neighbouring letters stay apart
_LEFT = 26  # pixels left of the first column for the plane names
_TOP = 16  # pixels above the first row for the column titles
_BOTTOM = 44  # pixels below the last row for colour bars and the legend
_FONT_PX = 11
_TEXT = "#1d2330"


@dataclass
class Canvas:
    """A composed case view before the text is drawn: ``rgb`` ``(H, W, 3)`` uint8 and where things are.

    ``boxes[(plane, column)]`` is ``(top, left, height, width)`` of that displayed slice in pixels;
    ``texts`` are ``(x, y, text, style)`` with pixel positions from the top-left corner.
    """

    rgb: np.ndarray
    views: dict[str, PlaneView]
    px_per_mm: float
    boxes: dict[tuple[str, str], tuple[int, int, int, int]] = field(default_factory=dict)
    texts: list[tuple[float, float, str, dict]] = field(default_factory=list)


def compose_case_view(
    image: np.ndarray,
    affine: np.ndarray,
    labels: np.ndarray,
    prediction: np.ndarray,
    foreground_prob: np.ndarray,
    uncertainty: np.ndarray | None = None,
    *,
    uncertainty_name: str = "uncertainty",
    uncertainty_range: tuple[float, float] | None = None,
    convention: str = "radiological",
    panel_px: int = 128,
    band: tuple[np.ndarray | None, np.ndarray] | None = None,
) -> Canvas:
    """Compose the pixels of one case view (no text drawn yet; see :func:`case_view_png`).

    Args:
        image: intensities ``(X, Y, Z)`` in file voxel order (one channel).
        affine: 4x4 voxel-to-world matrix (RAS+ mm, as nibabel and ``read_volume`` give it).
        labels, prediction: integer label maps ``(X, Y, Z)``; every label > 0 is foreground.
        foreground_prob: ``1 - p_background`` ``(X, Y, Z)`` in [0, 1].
        uncertainty: optional voxel map ``(X, Y, Z)`` (entropy in nats, variance, ...).
        uncertainty_name: its name in the colour-bar label.
        uncertainty_range: colour-bar limits; default 0 to its largest value.
        convention: ``"radiological"`` (patient's right on the viewer's left) or ``"neurological"``.
        panel_px: pixels given to the longest slice side; all planes share one mm-to-pixel scale.
        band: optional conformal masks ``(inner or None, outer)`` ``(X, Y, Z)`` of the foreground,
            outlined on the image (inner ⊆ prediction ⊆ outer shows the uncertainty band).
    """
    given = {"image": image, "labels": labels, "prediction": prediction, "probability": foreground_prob}
    if uncertainty is not None:
        given["uncertainty"] = uncertainty
    inner, outer = band if band is not None else (None, None)
    if outer is not None:
        given["conformal outer mask"] = outer
    if inner is not None:
        given["conformal inner mask"] = inner
    shape = np.shape(image)
    if len(shape) != 3:
        raise DataError(f"case view: image of shape {shape}, expected three spatial axes (one channel)")
    for name, array in given.items():
        if np.shape(array) != shape:
            raise DataError(f"case view: {name} has shape {np.shape(array)}, the image {shape}")
    truth, predicted = np.asarray(labels) > 0, np.asarray(prediction) > 0
    # Without ground truth, the slices through the (false positive) prediction are the telling ones.
    views = plane_views(affine, shape, busiest_slices(truth if truth.any() else predicted), convention)
    extents = [slice_extent_mm(views[p], shape) for p in PLANES]
    px_per_mm = panel_px / max(max(e) for e in extents)
    sizes = {p: display_size(views[p], shape, px_per_mm) for p in PLANES}
    columns = ["image", "probability"] + (["uncertainty"] if uncertainty is not None else [])
    col_w = max(s[1] for s in sizes.values()) + 2 * _MARGIN + _GAP
    row_h = {p: sizes[p][0] + 2 * _MARGIN for p in PLANES}
    height = _TOP + sum(row_h.values()) + _BOTTOM + 12 * ((outer is not None) + (inner is not None))
    width = _LEFT + col_w * len(columns) - _GAP
    canvas = Canvas(np.full((height, width, 3), 255, np.uint8), views, px_per_mm)

    if uncertainty is not None and uncertainty_range is None:
        top = float(np.nanmax(uncertainty)) if np.size(uncertainty) else 0.0
        uncertainty_range = (0.0, top if top > 0 else 1.0)
    maps = {"image": image, "truth": truth, "predicted": predicted, "probability": foreground_prob, "uncertainty": uncertainty,
            "outer": None if outer is None else np.asarray(outer) > 0, "inner": None if inner is None else np.asarray(inner) > 0}
    window = _window(np.asarray(image))
    top_px = _TOP
    for plane in PLANES:
        view, size = views[plane], sizes[plane]
        panels = _plane_panels(view, size, maps, window, uncertainty_range)
        for c, column in enumerate(columns):
            left = _LEFT + c * col_w + (col_w - _GAP - size[1]) // 2
            box = (top_px + _MARGIN, left, size[0], size[1])
            canvas.rgb[box[0] : box[0] + size[0], left : left + size[1]] = panels[column]
            canvas.boxes[(plane, column)] = box
            _edge_letters(canvas, box, view.edges)
        n = shape[view.normal_axis]
        canvas.texts.append(
            (_LEFT / 2, top_px + row_h[plane] / 2, f"{plane}\nslice {view.index + 1}/{n}", {"rotate": True})
        )
        top_px += row_h[plane]

    titles = {"image": "image", "probability": "P(foreground)", "uncertainty": uncertainty_name}
    for c, column in enumerate(columns):
        left, inner = _LEFT + c * col_w, col_w - _GAP - 2 * _MARGIN
        canvas.texts.append((left + (col_w - _GAP) / 2, _TOP / 2, titles[column], {"bold": True}))
        if column == "image":
            _legend(canvas, left + _MARGIN, top_px + 4, inner, maps["outer"] is not None, maps["inner"] is not None)
        else:
            limits = (0.0, 1.0) if column == "probability" else uncertainty_range
            _colour_bar(canvas, left + _MARGIN, top_px + 6, inner, limits, PROB_CMAP if column == "probability" else UNCERTAINTY_CMAP)
    return canvas


def _plane_panels(
    view: PlaneView,
    size: tuple[int, int],
    maps: dict[str, np.ndarray | None],
    window: tuple[float, float],
    uncertainty_range: tuple[float, float] | None,
) -> dict[str, np.ndarray]:
    """The RGB panels of one plane: outlines on the image, probability and uncertainty over it.

    The ground-truth outline runs just outside the true mask and the predicted one just inside
    the predicted mask, so both stay visible where they agree; the ground truth is drawn on the
    heat maps too, to show where the probability and uncertainty lie against the true boundary.
    """
    grey = _grey(resample(view.extract(maps["image"]), size, order=1), *window)
    gt = resample(view.extract(maps["truth"]), size, order=0)
    pred = resample(view.extract(maps["predicted"]), size, order=0)
    gt_ring = ndimage.binary_dilation(gt) & ~gt
    pred_ring = pred & ~ndimage.binary_erosion(pred, border_value=1)
    panels = {"image": grey.copy()}
    for name, colour in (("outer", OUTER_COLOUR), ("inner", INNER_COLOUR)):
        if maps.get(name) is not None:
            mask = resample(view.extract(maps[name]), size, order=0)
            panels["image"][mask & ~ndimage.binary_erosion(mask, border_value=1)] = colour
    panels["image"][pred_ring] = PRED_COLOUR
    panels["probability"] = _heat(grey, resample(view.extract(maps["probability"]), size, order=1), (0.0, 1.0), PROB_CMAP)
    if maps["uncertainty"] is not None:
        values = resample(view.extract(maps["uncertainty"]), size, order=1)
        panels["uncertainty"] = _heat(grey, values, uncertainty_range, UNCERTAINTY_CMAP)
    for rgb in panels.values():
        rgb[gt_ring] = GT_COLOUR
    return panels


def case_view_png(*args, **kwargs) -> bytes:
    """The case view of :func:`compose_case_view` (same arguments) as PNG bytes with its text."""
    return render_png(compose_case_view(*args, **kwargs))


def case_view_uri(*args, **kwargs) -> str:
    """The case view of :func:`compose_case_view` (same arguments) as a ``data:image/png`` URI."""
    return data_uri(case_view_png(*args, **kwargs))


def render_png(canvas: Canvas, colours: int = 256) -> bytes:
    """Draw the text of ``canvas`` onto a copy of its pixels and encode a palette PNG.

    The text is set with matplotlib's own DejaVu Sans (through Pillow, loaded once), which is
    faster than a matplotlib figure per case and gives the same glyphs on every machine.
    """
    picture = Image.fromarray(canvas.rgb)
    draw = ImageDraw.Draw(picture)
    for x, y, text, style in canvas.texts:
        font = _font(bool(style.get("bold")))
        if style.get("rotate"):
            box = [int(math.ceil(v)) for v in draw.multiline_textbbox((0, 0), text, font=font, align="center")]
            label = Image.new("L", (box[2] - box[0] + 2, box[3] - box[1] + 2), 0)
            ImageDraw.Draw(label).multiline_text((1 - box[0], 1 - box[1]), text, fill=255, font=font, align="center")
            label = label.transpose(Image.Transpose.ROTATE_90)
            corner = (int(round(x - label.width / 2)), int(round(y - label.height / 2)))
            picture.paste(Image.new("RGB", label.size, _TEXT), corner, label)
        else:
            draw.text((x, y), text, fill=_TEXT, font=font, anchor=style.get("anchor", "mm"))
    picture = picture.quantize(colors=colours, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


@lru_cache(maxsize=2)
def _font(bold: bool) -> ImageFont.FreeTypeFont:
    path = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans", weight="bold" if bold else "normal"))
    return ImageFont.truetype(path, _FONT_PX)


@dataclass(frozen=True)
class CaseView:
    """One case of the report's case gallery: its Dice, view (a data URI) and other figures to show."""

    case_id: str
    dice: float
    png_uri: str
    details: Mapping[str, float | str] = field(default_factory=dict)


def case_view_html(case_id: str, dice: float, png_uri: str, *, open_: bool = False, details: Mapping[str, float | str] | None = None) -> str:
    """A ``<details>`` block: the summary line names the case and its Dice, the body is the view."""
    facts = [f"Dice {_number(dice)}"] + [f"{html.escape(str(k))} {_number(v)}" for k, v in (details or {}).items()]
    alt = f"{case_id}: sagittal, coronal and axial slices with ground truth, prediction and probability"
    return (
        f"<details{' open' if open_ else ''}><summary><b>{html.escape(case_id)}</b> · {' · '.join(facts)}</summary>"
        f'<img alt="{html.escape(alt)}" src="{png_uri}" loading="lazy"></details>'
    )


def case_views_html(cases: Iterable[CaseView], n_open: int = 5) -> str:
    """All case views, worst Dice first; the ``n_open`` worst are unfolded, the rest folded.

    Cases whose Dice is NaN (no foreground in either map) come last.
    """
    ordered = sorted(cases, key=lambda c: (math.isnan(c.dice), c.dice if not math.isnan(c.dice) else 0.0, c.case_id))
    return "\n".join(
        case_view_html(c.case_id, c.dice, c.png_uri, open_=i < n_open, details=c.details) for i, c in enumerate(ordered)
    )


def _number(value: float | str) -> str:
    if isinstance(value, str):
        return html.escape(value)
    return "nan" if math.isnan(value) else f"{value:.3f}" if abs(value) < 1e3 else f"{value:.0f}"


def _window(image: np.ndarray) -> tuple[float, float]:
    """Robust grey window: the 0.5th and 99.5th percentiles of (a regular sample of) the volume."""
    step = max(1, round((image.size / 1_000_000) ** (1 / 3)))
    sample = image[::step, ::step, ::step]
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(sample, WINDOW_PERCENTILES))
    return (low, high) if high > low else (low, low + 1.0)


def _grey(plane: np.ndarray, low: float, high: float) -> np.ndarray:
    level = np.clip((np.nan_to_num(plane, nan=low) - low) / (high - low), 0.0, 1.0)
    return np.repeat((level * 255).astype(np.uint8)[..., None], 3, axis=2)


_LUTS: dict[str, np.ndarray] = {}


def _lut(name: str) -> np.ndarray:
    if name not in _LUTS:
        _LUTS[name] = (matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.float32)
    return _LUTS[name]


def _heat(grey: np.ndarray, values: np.ndarray, limits: tuple[float, float], cmap: str) -> np.ndarray:
    """``values`` in colour over the grey image; near the lower limit the image shows through."""
    low, high = limits
    level = np.clip((np.nan_to_num(values, nan=low) - low) / max(high - low, 1e-12), 0.0, 1.0)
    colour = _lut(cmap)[(level * 255).astype(np.int64)]
    alpha = (0.85 * np.clip(level / 0.15, 0.0, 1.0))[..., None]
    return (grey * (1.0 - alpha) + colour * alpha).astype(np.uint8)


def _edge_letters(canvas: Canvas, box: tuple[int, int, int, int], edges: tuple[str, str, str, str]) -> None:
    top, left, h, w = box
    style = {"bold": True}
    half = _MARGIN / 2
    canvas.texts += [
        (left - half, top + h / 2, edges[0], style),
        (left + w + half, top + h / 2, edges[1], style),
        (left + w / 2, top - half, edges[2], style),
        (left + w / 2, top + h + half, edges[3], style),
    ]


def _legend(canvas: Canvas, left: int, top: int, width: int, outer: bool = False, inner: bool = False) -> None:
    """Swatches for the outlines and the scale bar (all planes share one mm scale)."""
    entries = [(GT_COLOUR, "ground truth"), (PRED_COLOUR, "prediction")]
    entries += [(OUTER_COLOUR, "conformal outer")] if outer else []
    entries += [(INNER_COLOUR, "conformal inner")] if inner else []
    for i, (colour, name) in enumerate(entries):
        y = top + 6 + 12 * i
        canvas.rgb[y - 1 : y + 2, left : left + 14] = colour
        canvas.texts.append((left + 18, y, name, {"anchor": "lm"}))
    bar_mm = scale_bar_mm(width / canvas.px_per_mm)
    bar_px = max(1, int(round(bar_mm * canvas.px_per_mm)))
    y = top + 6 + 12 * len(entries)
    canvas.rgb[y - 1 : y + 2, left : left + bar_px] = 0
    canvas.texts.append((left + bar_px + 4, y, f"{bar_mm:g} mm", {"anchor": "lm"}))


def _colour_bar(canvas: Canvas, left: int, top: int, width: int, limits: tuple[float, float], cmap: str) -> None:
    ramp = _lut(cmap)[np.linspace(0, 255, width).astype(np.int64)].astype(np.uint8)
    canvas.rgb[top : top + 7, left : left + width] = ramp[None]
    low, high = limits
    for fraction, anchor in ((0.0, "lm"), (0.5, "mm"), (1.0, "rm")):
        value = low + fraction * (high - low)
        canvas.texts.append((left + fraction * width, top + 15, f"{value:.3g}", {"anchor": anchor}))
