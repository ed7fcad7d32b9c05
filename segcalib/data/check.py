"""Dataset integrity checks, run before any long job (as nnU-Net does).

For every case: each file exists and loads; multi-channel images agree in shape and affine;
image and label have equal spatial shape and affine (tolerance :data:`AFFINE_TOL`); label values
are among the declared labels; images are finite. A NIfTI header whose sform/qform scale
disagrees with ``pixdim`` is a warning (it is read the ITK way, see :mod:`segcalib.data.volumes`).
All problems are collected and reported in one :class:`DataError` that names case and file.
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


@dataclass
class DatasetSummary:
    manifest: Manifest
    reports: list[CaseReport]

    @property
    def warnings(self) -> list[str]:
        return [w for r in self.reports for w in r.warnings]

    def format(self) -> str:
        """A short human-readable summary (what ``segcalib data check`` prints)."""
        m = self.manifest
        lines = [f"manifest: {m.path}", f"dataset:  {m.name}"]
        lines.append("labels:   " + ", ".join(f"{k}={v}" for k, v in m.labels.items()))
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
                    + ", ".join(f"{m.labels.get(k, k)} {v} ({100 * v / total:.2f}%)" for k, v in sorted(totals.items()))
                )
            unlabelled = sum(1 for r in self.reports if r.case.label is None)
            if unlabelled:
                lines.append(f"unlabelled cases: {unlabelled} (nothing to evaluate against)")
        for w in self.warnings:
            lines.append(f"warning: {w}")
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
            report.warnings.append(_spacing_warning(where, header))
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
        report.warnings.append(_spacing_warning(where, header))
    if label.shape != image.shape[:3]:
        report.problems.append(
            f"{where}: label {case.label} has shape {label.shape}, image {image.path} has {image.shape[:3]}"
        )
        return
    if not np.allclose(header.affine, image.affine, atol=AFFINE_TOL, rtol=0):
        diff = float(np.abs(header.affine - image.affine).max())
        report.problems.append(
            f"{where}: label {case.label} and image {image.path} have different affines (max difference {diff:.3g})"
        )
        return
    if np.issubdtype(label.dtype, np.floating):
        if not np.isfinite(label).all() or not np.array_equal(label, np.round(label)):
            report.problems.append(f"{where}: label {case.label} holds non-integer values")
            return
    values, counts = np.unique(label, return_counts=True)
    undeclared = [int(v) for v in values if int(v) not in manifest.labels]
    if undeclared:
        report.problems.append(
            f"{where}: label {case.label} holds value(s) {undeclared} not declared in 'labels' "
            f"({sorted(manifest.labels)})"
        )
        return
    report.label_counts = {int(v): int(n) for v, n in zip(values, counts)}


def _spacing_warning(where: str, header: VolumeHeader) -> str:
    implied = " x ".join(f"{v:g}" for v in header.header_spacing or ())
    pixdim = " x ".join(f"{v:g}" for v in header.spacing)
    return (
        f"{where}: {header.path}: sform/qform spacing {implied} mm disagrees with pixdim {pixdim} mm; "
        "using pixdim (as ITK does)"
    )
