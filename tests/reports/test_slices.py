"""Case views: planes and edge letters from the affine (checked against nibabel and world
coordinates), the busiest slice, true-shape pixels, outlines where the masks' edges are, heat maps
that are the colour map over the image, small PNGs, and the worst-first HTML gallery."""

from __future__ import annotations

import io
import math
import os
import re

import matplotlib
import numpy as np
import pytest
from nibabel.orientations import aff2axcodes
from PIL import Image
from scipy import ndimage

from segcalib.data.volumes import read_volume
from segcalib.errors import DataError
from segcalib.reports.slice_layout import PLANES, busiest_slices, plane_views, scale_bar_mm
from segcalib.reports.slices import (
    GT_COLOUR,
    INNER_COLOUR,
    OUTER_COLOUR,
    PRED_COLOUR,
    CaseView,
    case_view_html,
    case_view_uri,
    case_views_html,
    compose_case_view,
    render_png,
)
from tests.conftest import REPO_ROOT

OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}
# plane -> (normal world axis, world axis across, world axis down)
WORLD = {"sagittal": (0, 1, 2), "coronal": (1, 0, 2), "axial": (2, 0, 1)}


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _affine(columns: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(5.0, -7.0, 3.0)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = columns * np.asarray(spacing)
    affine[:3, 3] = origin
    return affine


AFFINES = {
    "RAS": _affine(np.eye(3)),
    "LPS": _affine(np.diag([-1.0, -1.0, 1.0]), spacing=(0.8, 0.8, 2.5)),
    # voxel axes along (S, L, P), then tilted by 20 and 10 degrees: oblique and permuted
    "oblique-permuted": _affine(
        _rotation(0, 20) @ _rotation(2, 10) @ np.array([[0.0, -1, 0], [0, 0, -1], [1, 0, 0]]), spacing=(3.0, 0.7, 1.1)
    ),
}


@pytest.mark.parametrize("name", sorted(AFFINES))
@pytest.mark.parametrize("convention", ["radiological", "neurological"])
def test_edge_letters_and_axes_follow_the_affine(name: str, convention: str) -> None:
    affine = AFFINES[name]
    codes = aff2axcodes(affine)
    views = plane_views(affine, (20, 22, 24), (3, 4, 5), convention)
    expected = {
        "sagittal": ("A", "P", "S", "I"),
        "coronal": ("R", "L", "S", "I") if convention == "radiological" else ("L", "R", "S", "I"),
        "axial": ("R", "L", "A", "P") if convention == "radiological" else ("L", "R", "A", "P"),
    }
    for plane, view in views.items():
        assert view.edges == expected[plane]
        # The letter at the right (bottom) edge is where the displayed column (row) index grows.
        right = codes[view.col_axis] if not view.col_flip else OPPOSITE[codes[view.col_axis]]
        bottom = codes[view.row_axis] if not view.row_flip else OPPOSITE[codes[view.row_axis]]
        assert (view.edges[1], view.edges[3]) == (right, bottom)
        assert codes[view.normal_axis] in {"sagittal": "RL", "coronal": "AP", "axial": "SI"}[plane]
        assert view.index == (3, 4, 5)[view.normal_axis]
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        assert (view.row_mm, view.col_mm) == pytest.approx((spacing[view.row_axis], spacing[view.col_axis]))


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_displayed_slices_run_the_way_the_letters_say_in_world_coordinates(name: str) -> None:
    affine = AFFINES[name]
    shape = (9, 11, 13)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    letter_sign = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    for plane, view in plane_views(affine, shape, (4, 5, 6)).items():
        normal_w, across_w, down_w = WORLD[plane]
        coords = [view.extract(world[..., w]) for w in range(3)]
        # moving right goes towards the right-edge letter, moving down towards the bottom letter
        axis, sign = letter_sign[view.edges[1]]
        assert axis == across_w and sign * np.diff(coords[axis], axis=1).mean() > 0
        axis, sign = letter_sign[view.edges[3]]
        assert axis == down_w and sign * np.diff(coords[axis], axis=0).mean() > 0
        # the voxel axis across the slice points mostly along the plane's normal world axis
        assert int(np.argmax(np.abs(affine[:3, view.normal_axis]))) == normal_w


def test_the_shown_slice_has_the_most_ground_truth_along_each_axis() -> None:
    rng = np.random.default_rng(3)
    labels = (ndimage.gaussian_filter(rng.random((18, 21, 15)), 2.0) > 0.53).astype(np.int64)
    labels[labels > 0] = rng.integers(1, 3, int(labels.sum()))
    counts = [[int((np.take(labels, i, axis=a) > 0).sum()) for i in range(labels.shape[a])] for a in range(3)]
    expected = tuple(int(np.argmax(c)) for c in counts)
    assert busiest_slices(labels > 0) == expected
    assert busiest_slices(np.zeros((4, 5, 6), bool)) == (2, 2, 3)
    affine = AFFINES["oblique-permuted"]
    image = rng.random(labels.shape).astype(np.float32)
    canvas = compose_case_view(image, affine, labels, labels, (labels > 0).astype(np.float32))
    for view in canvas.views.values():
        assert view.index == expected[view.normal_axis]
    # no ground truth at all: the slices through the most predicted foreground
    canvas = compose_case_view(image, affine, np.zeros_like(labels), labels, (labels > 0).astype(np.float32))
    assert {v.normal_axis: v.index for v in canvas.views.values()} == dict(enumerate(expected))


def _ras_case(size: int = 32):
    """A 1 mm RAS case with an ellipsoid of ground truth (two classes) and a shifted prediction."""
    rng = np.random.default_rng(0)
    image = ndimage.gaussian_filter(rng.random((size,) * 3), 1.5).astype(np.float32)
    x, y, z = np.meshgrid(*[np.arange(size)] * 3, indexing="ij")
    ellipsoid = lambda c: ((x - c[0]) / 7) ** 2 + ((y - c[1]) / 8) ** 2 + ((z - c[2]) / 5) ** 2 <= 1  # noqa: E731
    labels = np.where(ellipsoid((14, 16, 13)), np.where(y > 16, 2, 1), 0).astype(np.int64)
    prediction = ellipsoid((16, 18, 14)).astype(np.int64)
    prob = ndimage.gaussian_filter((prediction > 0).astype(np.float32), 1.0)
    return image, np.eye(4), labels, prediction, prob


def test_outlines_are_drawn_at_the_mask_edges_and_nowhere_else() -> None:
    image, affine, labels, prediction, prob = _ras_case()
    canvas = compose_case_view(image, affine, labels, prediction, prob, panel_px=96)  # 3 px per mm
    k = busiest_slices(labels > 0)[2]
    # RAS, radiological axial: rows run A -> P (y falling), columns R -> L (x falling).
    def shown(volume):
        return np.kron(volume[:, :, k].T[::-1, ::-1], np.ones((3, 3), int)).astype(bool)

    gt, pred = shown(labels > 0), shown(prediction > 0)
    gt_ring = ndimage.binary_dilation(gt) & ~gt
    pred_ring = pred & ~ndimage.binary_erosion(pred, border_value=1)
    top, left, h, w = canvas.boxes[("axial", "image")]
    assert (h, w) == gt.shape
    panel = canvas.rgb[top : top + h, left : left + w]
    is_gt = (panel == GT_COLOUR).all(axis=-1)
    is_pred = (panel == PRED_COLOUR).all(axis=-1)
    assert gt_ring.sum() > 50 and (pred_ring & ~gt_ring).sum() > 50
    assert is_gt[gt_ring].all() and not is_gt[~gt_ring].any()
    assert is_pred[pred_ring & ~gt_ring].all() and not is_pred[~pred_ring].any()
    # the PNG keeps them: palette colours stay close to the outline colours
    decoded = np.asarray(Image.open(io.BytesIO(render_png(canvas))).convert("RGB")).astype(int)
    panel = decoded[top : top + h, left : left + w]
    near = lambda colour: np.abs(panel - np.array(colour)).max(axis=-1) <= 24  # noqa: E731
    assert near(GT_COLOUR)[gt_ring].mean() > 0.95
    assert near(PRED_COLOUR)[pred_ring & ~gt_ring].mean() > 0.95
    assert near(GT_COLOUR)[~ndimage.binary_dilation(gt_ring, iterations=2)].mean() < 0.01


def test_the_conformal_band_is_outlined_inside_its_masks() -> None:
    image, affine, labels, prediction, prob = _ras_case()
    outer = ndimage.binary_dilation(prediction > 0, iterations=2)
    inner = ndimage.binary_erosion(prediction > 0, iterations=2)
    canvas = compose_case_view(image, affine, labels, prediction, prob, panel_px=96, band=(inner, outer))
    k = busiest_slices(labels > 0)[2]

    def shown(volume):  # as above: RAS, radiological axial, 3 px per mm
        return np.kron(volume[:, :, k].T[::-1, ::-1], np.ones((3, 3), int)).astype(bool)

    gt, pred, out, inn = shown(labels > 0), shown(prediction > 0), shown(outer), shown(inner)
    covered = (ndimage.binary_dilation(gt) & ~gt) | (pred & ~ndimage.binary_erosion(pred, border_value=1))
    out_ring = out & ~ndimage.binary_erosion(out, border_value=1) & ~covered
    in_ring = inn & ~ndimage.binary_erosion(inn, border_value=1) & ~covered
    top, left, h, w = canvas.boxes[("axial", "image")]
    panel = canvas.rgb[top : top + h, left : left + w]
    is_outer, is_inner = (panel == OUTER_COLOUR).all(-1), (panel == INNER_COLOUR).all(-1)
    assert out_ring.sum() > 50 and in_ring.sum() > 20
    assert is_outer[out_ring].all() and not is_outer[~out].any()
    assert is_inner[in_ring].all() and not is_inner[~inn].any()
    assert {"conformal outer", "conformal inner"} <= {t[2] for t in canvas.texts}
    plain = compose_case_view(image, affine, labels, prediction, prob, panel_px=96)
    assert not (plain.rgb == OUTER_COLOUR).all(-1).any() and "conformal outer" not in {t[2] for t in plain.texts}


def test_heat_maps_are_the_colour_map_over_the_image() -> None:
    image, affine, labels, prediction, _ = _ras_case()
    prob = (prediction > 0).astype(np.float32)  # 0 or 1: no interpolated values inside or far away
    entropy = prob * 0.5
    canvas = compose_case_view(image, affine, labels, prediction, prob, entropy, uncertainty_range=(0.0, 1.0), panel_px=96)
    k = busiest_slices(labels > 0)[0]

    def shown(volume):  # sagittal of RAS: rows run S -> I, columns A -> P
        return np.kron(volume[k].T[::-1, ::-1], np.ones((3, 3), int)).astype(bool)

    inside, gt = shown(prediction > 0), shown(labels > 0)
    gt_ring = ndimage.binary_dilation(gt) & ~gt
    core = ndimage.binary_erosion(inside, iterations=3) & ~ndimage.binary_dilation(gt_ring, iterations=2)
    far = ~ndimage.binary_dilation(inside | gt, iterations=3)
    assert core.sum() > 100 and far.sum() > 100
    panels = {}
    for column in ("image", "probability", "uncertainty"):
        top, left, h, w = canvas.boxes[("sagittal", column)]
        panels[column] = canvas.rgb[top : top + h, left : left + w].astype(float)
    grey = panels["image"]
    for column, cmap, value in (("probability", "inferno", 1.0), ("uncertainty", "viridis", 0.5)):
        colour = np.asarray(matplotlib.colormaps[cmap](int(value * 255))[:3]) * 255
        expected = 0.15 * grey[core] + 0.85 * colour
        assert np.abs(panels[column][core] - expected).max() <= 1.0
        assert np.array_equal(panels[column][far], grey[far])  # p = 0: the image shows through


def test_true_shape_with_anisotropic_voxels_and_expected_canvas_size() -> None:
    # The hippocampus crop shape at 1 mm: widths (A/P 51, R/L 35, R/L 35) mm, heights 35, 35, 51.
    shape = (35, 51, 35)
    zeros = np.zeros(shape, np.float32)
    canvas = compose_case_view(zeros, np.eye(4), zeros.astype(int), zeros.astype(int), zeros, zeros, panel_px=128)
    assert canvas.px_per_mm == pytest.approx(128 / 51)
    # 26 px for the plane names, columns of the widest slice (128) + 2 * 11 with 6 px between; 16 + rows + 44
    assert canvas.rgb.shape == (16 + (88 + 22) * 2 + (128 + 22) + 44, 26 + 3 * 150 + 2 * 6, 3)
    # voxels of 0.5 x 0.5 x 4 mm: a 40 x 40 x 10 grid spans 20 x 20 x 40 mm
    affine = np.diag([0.5, 0.5, 4.0, 1.0])
    shape = (40, 40, 10)
    zeros = np.zeros(shape, np.float32)
    canvas = compose_case_view(zeros, affine, zeros.astype(int), zeros.astype(int), zeros, panel_px=120)
    for plane, (height_mm, width_mm) in {"sagittal": (40, 20), "coronal": (40, 20), "axial": (20, 20)}.items():
        _, _, h, w = canvas.boxes[(plane, "image")]
        assert (h, w) == (round(height_mm * 3), round(width_mm * 3))


def test_scale_bar_lengths_are_round_numbers() -> None:
    assert [scale_bar_mm(w) for w in (51, 35, 240, 8, 0.3)] == [10, 5, 50, 2, 0.05]


HIPPOCAMPUS = os.path.join(REPO_ROOT, "data", "msd_hippocampus")


@pytest.mark.skipif(not os.path.isdir(HIPPOCAMPUS), reason="the MSD hippocampus sample is not in this checkout")
def test_real_cases_give_small_pngs_that_decode() -> None:
    sizes = []
    for case in ("hippocampus_001", "hippocampus_017"):
        image, header = read_volume(os.path.join(HIPPOCAMPUS, "imagesTr", f"{case}.nii.gz"))
        labels, _ = read_volume(os.path.join(HIPPOCAMPUS, "labelsTr", f"{case}.nii.gz"), dtype=np.int64)
        prediction = ndimage.binary_dilation(labels > 0).astype(np.int64)
        prob = ndimage.gaussian_filter(prediction.astype(np.float32), 1.0)
        p = np.clip(prob, 1e-6, 1 - 1e-6)
        entropy = -(p * np.log(p) + (1 - p) * np.log(1 - p))
        uri = case_view_uri(image, header.affine, labels, prediction, prob, entropy, uncertainty_name="entropy (nats)")
        assert uri.startswith("data:image/png;base64,")
        png = __import__("base64").b64decode(uri.split(",", 1)[1])
        sizes.append(len(png))
        decoded = matplotlib.image.imread(io.BytesIO(png), format="png")
        assert 350 <= decoded.shape[0] <= 500 and 400 <= decoded.shape[1] <= 520
    assert max(sizes) <= 60_000


def test_bad_input_is_refused_with_a_message() -> None:
    zeros = np.zeros((6, 7, 8), np.float32)
    with pytest.raises(DataError, match="prediction has shape"):
        compose_case_view(zeros, np.eye(4), zeros, zeros[:5], zeros)
    with pytest.raises(DataError, match="convention"):
        compose_case_view(zeros, np.eye(4), zeros, zeros, zeros, convention="left-handed")
    with pytest.raises(DataError, match="invertible"):
        plane_views(np.zeros((4, 4)), (6, 7, 8), (0, 0, 0))


def test_gallery_puts_the_worst_cases_first_and_unfolded() -> None:
    cases = [
        CaseView("b<1>", 0.91, "data:image/png;base64,AA"),
        CaseView("a", float("nan"), "data:image/png;base64,AB"),
        CaseView("c", 0.42, "data:image/png;base64,AC", {"HD95": 7.25}),
        CaseView("d", 0.77, "data:image/png;base64,AD"),
    ]
    page = case_views_html(cases, n_open=2)
    blocks = re.findall(r"<details( open)?><summary><b>([^<]*)</b>", page)
    assert blocks == [(" open", "c"), (" open", "d"), ("", "b&lt;1&gt;"), ("", "a")]
    assert "Dice 0.420 · HD95 7.250" in page and "Dice nan" in page
    single = case_view_html("x", 0.5, "data:image/png;base64,QQ", open_=True)
    assert single.startswith("<details open>") and 'src="data:image/png;base64,QQ"' in single
    assert {p for p in PLANES} == {"sagittal", "coronal", "axial"}
