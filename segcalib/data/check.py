"""Dataset integrity checks, run before any long job (as nnU-Net does).

For every case: each file exists and loads; multi-channel images agree in shape and affine;
image and label have equal spatial shape and affine (tolerance :data:`AFFINE_TOL`); label values
are among the declared labels; images are finite. A NIfTI header whose sform/qform scale
disagrees with ``pixdim`` is a warning (it is read the ITK way, see :mod:`segcalib.data.volumes`);
many such files make one summary line (:class:`Notices`), the full list with ``--verbose``.
All problems are collected and reported in one :class:`DataError` that names case and file.
2D files are single-slice volumes ``(H, W, 1)`` here, so 2D and 3D cases mix.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from segcalib.data.manifest import SPLITS, Case, Manifest
from segcalib.data.volumes import VolumeHeader, read_volume
from segcalib.errors import DataError

AFFINE_TOL = 1e-4
MAX_LISTED_PROBLEMS = 20
HEADER_SPACING = "header spacing"
_SUMMARIES = {
    HEADER_SPACING: "{n} files have a sform/qform spacing that disagrees with pixdim; they are read with the "
    "pixdim spacing (as ITK does) and maps exported for them get a self-consistent header (sform = qform, mm). "
    "Example: {example}",
}


@dataclass
class Notices:
    """Warnings grouped by kind: a kind seen in many files makes one line (count, one example,
    what was done); ``verbose`` lists every file as well."""

    groups: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, message: str) -> None:
        self.groups.setdefault(kind, []).append(message)

    def lines(self, verbose: bool = False) -> list[str]:
        out = []
        for kind, messages in self.groups.items():
            template = _SUMMARIES.get(kind)
            if len(messages) == 1 or template is None:
                out.extend(messages)
                continue
            out.append(template.format(n=len(messages), example=messages[0]))
            if verbose:
                out.extend(f"  {m}" for m in messages)
            else:
                out.append(f"  (run with --verbose for the list of {len(messages)} files)")
        return out


@dataclass
class CaseReport:
    """What the check learned about one case (used for the summary)."""

    case: Case
    shape: tuple[int, ...] = ()
    spacing: tuple[float, ...] = ()
    intensity: tuple[float, float] = (np.nan, np.nan)
    label_counts: dict[int, int] = field(default_factory=dict)
    dtypes: tuple[str, ...] = ()
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    header_fixes: list[str] = field(default_factory=list)  # sform/pixdim disagreements, one per file
    ndim: int = 3


@dataclass
class DatasetSummary:
    manifest: Manifest
    reports: list[CaseReport]

    @property
    def warnings(self) -> list[str]:
        """Every warning, one per file or case (ungrouped)."""
        return [w for r in self.reports for w in r.header_fixes + r.warnings]

    def notices(self) -> Notices:
        notices = Notices()
        for r in self.reports:
            for message in r.header_fixes:
                notices.add(HEADER_SPACING, message)
            for message in r.warnings:
                notices.add("other", message)
        if self.manifest.unlabelled:
            listed = "; ".join(self.manifest.unlabelled[:5]) + ("; ..." if len(self.manifest.unlabelled) > 5 else "")
            notices.add("unlabelled", f"{len(self.manifest.unlabelled)} training/validation case(s) have no label and "
                        f"are left out of training and evaluation (--allow-unlabelled): {listed}")
        return notices

    def format(self, verbose: bool = False) -> str:
        """A short human-readable summary (what ``segcalib data check`` prints); ``verbose``
        lists every file behind a grouped warning."""
        m = self.manifest
        lines = [f"manifest: {m.path}", f"dataset:  {m.name}"]
        ignore = {} if m.ignore_label is None else {m.ignore_label: "ignore (not a class)"}
        lines.append("labels:   " + ", ".join(f"{k}={v}" for k, v in {**m.labels, **ignore}.items()))
        lines.append("channels: " + ", ".join(f"{k}={v}" for k, v in m.channels.items()))
        counts = ", ".join(f"{s} {len(m.splits[s])}" for s in SPLITS)
        generated = f" (made by a seeded split: {', '.join(m.generated_splits)})" if m.generated_splits else ""
        lines.append(f"cases:    {counts}{generated}")
        if self.reports:
            shapes = np.array([r.shape[:3] for r in self.reports if r.shape])
            lines.append(
                "shape:    " + " x ".join(f"{lo}..{hi}" for lo, hi in zip(shapes.min(0), shapes.max(0)))
            )
            spacing = Counter(tuple(round(s, 4) for s in r.spacing) for r in self.reports if r.spacing)
            lines.append(
                "spacing:  "
                + "; ".join(f"{' x '.join(f'{v:g}' for v in sp)} mm ({n} cases)" for sp, n in spacing.most_common(5))
            )
            lows = [r.intensity[0] for r in self.reports]
            highs = [r.intensity[1] for r in self.reports]
            lines.append(
                f"intensity: min {np.nanmin(lows):.4g}..{np.nanmax(lows):.4g}, max {np.nanmin(highs):.4g}..{np.nanmax(highs):.4g}"
            )
            dtypes = Counter(r.dtypes[0] for r in self.reports if r.dtypes)
            lines.append("image dtypes: " + ", ".join(f"{d} ({n})" for d, n in dtypes.most_common()))
            totals: Counter[int] = Counter()
            for r in self.reports:
                totals.update(r.label_counts)
            if totals:
                total = sum(totals.values())
                lines.append(
                    "voxels per label: "
                    + ", ".join(f"{m.labels.get(k, ignore.get(k, k))} {v} ({100 * v / total:.2f}%)" for k, v in sorted(totals.items()))
                )
            unlabelled = sum(1 for r in self.reports if r.case.label is None)
            if unlabelled:
                lines.append(f"unlabelled cases: {unlabelled} (nothing to evaluate against)")
            flat = sum(1 for r in self.reports if r.shape and r.ndim == 2)
            if flat:
                lines.append(f"2D cases: {flat} (single slices, shown as H x W x 1)")
        for line in self.notices().lines(verbose):
            lines.append(line if line.startswith("  ") else f"warning: {line}")
        return "\n".join(lines)


def check_manifest(manifest: Manifest, splits: tuple[str, ...] = SPLITS, workers: int | None = None) -> DatasetSummary:
    """Open and check every file of ``splits``; raise one DataError listing all problems."""
    cases = [c for s in splits for c in manifest.splits[s]]
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reports = list(pool.map(lambda c: check_case(c, manifest), cases))
    problems = [p for r in reports for p in r.problems]
    if problems:
        shown = problems[:MAX_LISTED_PROBLEMS]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        noun = "problem" if len(problems) == 1 else "problems"
        raise DataError(f"{manifest.path}: {len(problems)} {noun} found:\n  " + "\n  ".join(shown) + more)
    return DatasetSummary(manifest=manifest, reports=reports)


def check_case(case: Case, manifest: Manifest) -> CaseReport:
    """Check one case; problems and warnings are recorded on the report, not raised."""
    report = CaseReport(case=case)
    where = f"case {case.case_id}"
    headers: list[VolumeHeader] = []
    lows, highs = [], []
    for path in case.images:
        try:
            array, header = read_volume(path, dtype=None)
        except DataError as exc:
            report.problems.append(f"{where}: image {exc}")
            continue
        headers.append(header)
        report.dtypes += (str(array.dtype),)
        if header.spacing_disagrees:
            report.header_fixes.append(_spacing_warning(where, header))
        if not np.issubdtype(array.dtype, np.number):
            report.problems.append(f"{where}: image {path}: voxel type {array.dtype} is not numeric")
            continue
        finite = np.isfinite(array)
        if not finite.all():
            n_bad = int(array.size - finite.sum())
            report.problems.append(f"{where}: image {path}: {n_bad} voxel(s) are NaN or infinite")
            continue
        lows.append(float(array.min()))
        highs.append(float(array.max()))
    if not headers or report.problems:
        return report
    first = headers[0]
    spatial = first.shape[:3]
    for other in headers[1:]:
        if other.shape[:3] != spatial or not np.allclose(other.affine, first.affine, atol=AFFINE_TOL, rtol=0):
            report.problems.append(
                f"{where}: channel {other.path} has shape {other.shape} / affine unlike {first.path} {first.shape}"
            )
    n_channels = sum(h.shape[3] if len(h.shape) > 3 else 1 for h in headers)
    if n_channels != manifest.num_channels:
        report.problems.append(
            f"{where}: image {first.path}: {n_channels} channel(s) but the manifest declares {manifest.num_channels}"
        )
    report.shape = spatial
    report.ndim = first.ndim
    report.spacing = first.spacing
    report.intensity = (min(lows), max(highs))
    if case.label is not None:
        _check_label(case, manifest, first, report)
    return report


def _check_label(case: Case, manifest: Manifest, image: VolumeHeader, report: CaseReport) -> None:
    where = f"case {case.case_id}"
    try:
        label, header = read_volume(case.label, dtype=None)
    except DataError as exc:
        report.problems.append(f"{where}: label {exc}")
        return
    if header.spacing_disagrees:
        report.header_fixes.append(_spacing_warning(where, header))
    if label.shape != image.shape[:3]:
        report.problems.append(
            f"{where}: label {case.label} has shape {label.shape}, image {image.path} has {image.shape[:3]}"
        )
        return
    if not np.allclose(header.affine, image.affine, atol=AFFINE_TOL, rtol=0):
        diff = float(np.abs(header.affine - image.affine).max())
        report.problems.append(
            f"{where}: label {case.label} and image {image.path} have different affines (max difference {diff:.3g})"
            + _same_space_note(header.affine, image.affine, image.shape[:3])
        )
        return
    if np.issubdtype(label.dtype, np.floating):
        if not np.isfinite(label).all() or not np.array_equal(label, np.round(label)):
            report.problems.append(f"{where}: label {case.label} holds non-integer values")
            return
    values, counts = np.unique(label, return_counts=True)
    undeclared = [int(v) for v in values if int(v) not in manifest.labels and int(v) != manifest.ignore_label]
    if undeclared:
        report.problems.append(
            f"{where}: label {case.label} holds value(s) {undeclared} not declared in 'labels' "
            f"({sorted(manifest.labels)})"
        )
        return
    report.label_counts = {int(v): int(n) for v, n in zip(values, counts)}


def _same_space_note(label_affine: np.ndarray, image_affine: np.ndarray, shape: tuple[int, ...]) -> str:
    """When the label's voxel grid is the image's up to axis flips/permutations (the same
    physical space, voxels stored in another order), say so and which axes differ."""
    relation = np.linalg.solve(image_affine, label_affine)  # label voxel index -> image voxel index
    rotation, offset = relation[:3, :3], relation[:3, 3]
    rounded = np.rint(rotation)
    if not np.allclose(rotation, rounded, atol=1e-3) or not (np.abs(rounded).sum(0) == 1).all() \
            or not (np.abs(rounded).sum(1) == 1).all():
        return ""
    steps = []
    for axis in range(3):
        source = int(np.flatnonzero(rounded[axis])[0])
        flipped = rounded[axis, source] < 0
        expected = shape[axis] - 1.0 if flipped else 0.0
        if abs(offset[axis] - expected) > 1e-3 or shape[axis] != shape[source]:
            return ""
        if flipped or source != axis:
            steps.append(f"image axis {axis} = label axis {source}{' reversed' if flipped else ''}")
    return (
        "; both describe the same physical space (the label stores its voxels in another order: "
        + ", ".join(steps)
        + "); write the label with the image's affine and voxel order"
    )


def _spacing_warning(where: str, header: VolumeHeader) -> str:
    implied = " x ".join(f"{v:g}" for v in header.header_spacing or ())
    pixdim = " x ".join(f"{v:g}" for v in header.spacing)
    return (
        f"{where}: {header.path}: sform/qform spacing {implied} mm disagrees with pixdim {pixdim} mm; "
        "using pixdim (as ITK does)"
    )
