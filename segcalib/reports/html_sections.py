"""Sections of report.html beyond the calibration tables: the protocol, the uncertainty quality
(tables, risk-coverage plot, uncertainty-vs-Dice scatter) and the per-case slice views."""

from __future__ import annotations

import html
import math
from typing import Any, Callable, Mapping, Sequence

from segcalib.reports.slices import CaseView, case_views_html
from segcalib.reports.uncertainty_figures import RiskCoverage, risk_coverage_uri, uncertainty_dice_uri
from segcalib.spatial.regions import ALL

Table = Callable[[Sequence[str], Sequence[Sequence[Any]]], str]
Fmt = Callable[..., str]
MAP_TITLES = {
    "entropy": "predictive entropy",
    "mutual_info": "mutual information (epistemic)",
    "expected_entropy": "expected entropy (aleatoric)",
    "one_minus_max": "1 − max p",
}
N_OPEN = 5  # worst cases unfolded


def protocol_html(report: dict[str, Any], table: Table) -> str:
    """Which protocol produced the report, its source, and its own values."""
    section = report.get("protocol") or {}
    if not section:
        return ""
    parts = [
        f"<h2 id=\"protocol\">Protocol: {html.escape(str(section['name']))}</h2>",
        f'<p class="note">{html.escape(str(section["title"]))}. Source: {html.escape(str(section["source"]))}.</p>',
    ]
    values = section.get("values") or {}
    scalars = [(k, v) for k, v in values.items() if not isinstance(v, (list, dict))]
    if scalars:
        parts.append(table(["value", section["name"]], scalars))
    return "".join(parts)


def uncertainty_html(report: dict[str, Any], table: Table, fmt: Fmt, figure_uri: Callable[[str, str], str]) -> str:
    """Uncertainty-quality tables per map and region, the risk-coverage plot and the scatter."""
    section = report.get("uncertainty")
    if not section:
        return ""
    parts = [
        '<h2 id="uncertainty">Uncertainty: does it point at the errors?</h2>',
        '<p class="note">Error = argmax ≠ ground truth. AURC: mean error rate of the k most certain voxels over '
        "k = 1..N (lower is better; ± its histogram bound). AUROC: uncertainty as a detector of errors (0.5 = chance). "
        "UEO: Dice of the thresholded uncertainty with the error mask, best threshold and fixed threshold. "
        f"QU-BraTS: mean over foreground classes, thresholds {html.escape(_thresholds(section))} on the 0-100 scale.</p>",
    ]
    rows = []
    for name, by_region in section["metrics"].items():
        for region, m in by_region.items():
            rows.append([
                MAP_TITLES.get(name, name), region, m["voxels"], m["error_rate"], f"{fmt(m['aurc'])} ± {fmt(m['aurc_bound'], 2)}",
                m["e_aurc"], m["auroc"], f"{fmt(m['ueo_best'])} @ {fmt(m['ueo_best_threshold'], 3)}",
                f"{fmt(m['ueo'])} @ {fmt(m['ueo_threshold'], 3)}", m["qu_brats"]["score"],
            ])
    parts.append(table(["map", "region", "voxels", "error rate", "AURC", "E-AURC", "AUROC", "UEO best", "UEO fixed", "QU-BraTS"], rows))
    curves = [
        RiskCoverage(MAP_TITLES.get(name, name), by_region[ALL]["risk_coverage"]["coverage"],
                     by_region[ALL]["risk_coverage"]["risk"], by_region[ALL]["aurc"])
        for name, by_region in section["metrics"].items()
        if ALL in by_region and by_region[ALL]["risk_coverage"]["coverage"]
    ]
    figures = []
    if curves:
        figures.append(figure_uri(risk_coverage_uri(curves, "Risk–coverage, all voxels"), "risk-coverage over all voxels"))
    cases = report["cases"]
    first = section["maps"][0] if section["maps"] else None
    if first and cases:
        mean_u = [c.get("uncertainty", {}).get(first, math.nan) for c in cases]
        figures.append(figure_uri(
            uncertainty_dice_uri(mean_u, [_case_dice(c) for c in cases], [c["case"] for c in cases],
                                 f"mean {MAP_TITLES.get(first, first)} (foreground)"),
            f"per case: mean {MAP_TITLES.get(first, first)} vs mean foreground Dice",
        ))
    parts.append('<div class="figs">' + "".join(figures) + "</div>")
    corr = [[MAP_TITLES.get(n, n), c["pearson"], c["spearman"], c["n_cases"]] for n, c in section["case_correlation"].items()]
    parts.append("<h3>Case level: mean uncertainty vs Dice (negative = the model knows its bad cases)</h3>")
    parts.append(table(["map", "Pearson r", "Spearman ρ", "cases"], corr))
    return "".join(parts)


def case_gallery_html(report: dict[str, Any], views: Mapping[str, str]) -> str:
    """The per-case views, worst mean foreground Dice first, the first few unfolded."""
    if not views:
        return ""
    items = []
    for case in report["cases"]:
        if case["case"] not in views:
            continue
        details: dict[str, float | str] = {}
        hd95 = [c["hd95"] for c in case["classes"] if not math.isnan(c["hd95"])]
        if hd95:
            details["HD95 max"] = max(hd95)
        ece = case.get("calibration", {}).get("ece", {}).get(ALL)
        if ece is not None:
            details["ECE"] = ece
        u = case.get("uncertainty", {}).get("entropy")
        if u is not None:
            details["mean entropy"] = u
        items.append(CaseView(case["case"], _case_dice(case), views[case["case"]], details))
    return (
        '<h2 id="cases">Cases (worst mean foreground Dice first)</h2>'
        '<p class="note">Per case, the sagittal, coronal and axial slices with the most ground-truth foreground: '
        "the image with the ground-truth (cyan) and predicted (magenta) outlines, the foreground probability "
        "1 − p(background), and the predictive entropy. Click a line to unfold it.</p>"
        + case_views_html(items, n_open=N_OPEN)
    )


def _case_dice(case: dict[str, Any]) -> float:
    values = [c["dice"] for c in case["classes"] if not math.isnan(c["dice"])]
    return sum(values) / len(values) if values else math.nan


def _thresholds(section: dict[str, Any]) -> str:
    for by_region in section["metrics"].values():
        for m in by_region.values():
            return ", ".join(f"{t:g}" for t in m["qu_brats"]["thresholds"])
    return ""
