"""Self-contained HTML reports: inline CSS, figures embedded as data URIs, no external references."""

from __future__ import annotations

import html
import math
from typing import Any, Mapping, Sequence

from segcalib.reports.figures import Curve, data_uri, reliability_png
from segcalib.reports.html_sections import case_gallery_html, protocol_html, uncertainty_html
from segcalib.spatial.regions import ALL

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2330;max-width:1200px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #dde;padding-bottom:4px}
h3{font-size:14px;margin:14px 0 4px}
table{border-collapse:collapse;font-size:12.5px;margin:8px 0}th,td{padding:3px 8px;border-bottom:1px solid #e6e8ef;text-align:right}
th{background:#f3f5fa;position:sticky;top:0}td:first-child,th:first-child{text-align:left}
.meta td{text-align:left}.figs{display:flex;flex-wrap:wrap;gap:10px}.figs figure{margin:0}
figcaption{font-size:12px;color:#555;text-align:center}.note{color:#555;font-size:12.5px}
.bad{color:#b3261e}.best{font-weight:600;background:#eef7ee}
details{margin:4px 0;border:1px solid #e6e8ef;border-radius:4px;padding:2px 8px}summary{cursor:pointer;font-size:13px;padding:3px 0}
details img{display:block;margin:6px 0;max-width:100%}
"""


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return html.escape(str(value))


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], classes: Sequence[Sequence[str]] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cells = []
        for j, v in enumerate(row):
            cls = classes[i][j] if classes else ""
            cells.append(f'<td class="{cls}">{fmt(v)}</td>' if cls else f"<td>{fmt(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def figure(png: bytes, caption: str) -> str:
    return figure_uri(data_uri(png), caption)


def figure_uri(uri: str, caption: str) -> str:
    return f'<figure><img alt="{html.escape(caption)}" src="{uri}"><figcaption>{html.escape(caption)}</figcaption></figure>'


def page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>{body}</body></html>\n"
    )


def _curve(label: str, bins: dict[str, Sequence[float]], outcome: str = "accuracy") -> Curve:
    return Curve(label, bins["confidence"], bins[outcome], bins["count"])


def render_report(report: dict[str, Any], views: Mapping[str, str] | None = None) -> str:
    """The HTML page of one evaluation report; ``views``: case id -> slice view data URI."""
    meta = report["metadata"]
    names = meta["class_names"]
    n_bins = meta["n_bins"]
    cal = report["calibration"]
    parts = [f"<h1>Calibration report: {html.escape(str(meta.get('run') or meta['predictions']))}</h1>"]
    meta_rows = [
        ("split", meta["split"]),
        ("cases", report["counts"]["cases"]),
        ("model / loss", f"{meta.get('model')} / {meta.get('loss')}"),
        ("checkpoint", f"{meta.get('checkpoint')} (epoch {meta.get('checkpoint_epoch')})"),
        ("post-hoc calibration", _temperature_text(meta)),
        ("protocol", (report.get("protocol") or {}).get("title", meta.get("protocol", "segcalib"))),
        ("manifest", meta["manifest"]),
        ("bins", f"{n_bins} equal-width, bin b = (b/M, (b+1)/M], p = 0 in the first"
                 + ("" if meta.get("include_background", True) else "; CECE over foreground classes")),
        *((f"region {name}", text) for name, text in meta["regions"].items()),
        ("computed", f"{meta['time']} on {meta['device']} in {meta['seconds']} s, segcalib {meta['versions']['segcalib']}"),
    ]
    parts.append('<table class="meta">' + "".join(f"<tr><td>{k}</td><td>{fmt(v)}</td></tr>" for k, v in meta_rows) + "</table>")
    links = [("summary", "summary"), ("protocol", "protocol"), ("uncertainty", "uncertainty"), ("reliability", "reliability"),
             ("per-case", "per-case table"), ("cases", "case views")]
    parts.append('<p class="note">Go to: ' + " · ".join(f'<a href="#{a}">{t}</a>' for a, t in links) + "</p>")

    parts.append('<h2 id="summary">Summary (dataset-level pooling)</h2>')
    rows = []
    for region, r in cal.items():
        rows.append([region, r["n_voxels"], r["ece"], r["mce"], r["cece"], r["nll"], r["brier"]])
    parts.append(table(["region", "voxels", "ECE", "MCE", "CECE", "NLL", "Brier"], rows))
    media = report.get("media_foreground_ece")
    parts.append(
        f'<p class="note">Per-volume foreground ECE averaged over volumes (the MedIA convention): {fmt(media)}. '
        "Regions are defined on the ground truth so that methods are compared on the same voxels.</p>"
    )
    seg = report["segmentation"]
    rows = [[name, s["dice"], s["hd"], s["hd95"], s["assd"], s["hd95_n_inf"]] for name, s in seg["per_class"].items()]
    m = seg["mean_foreground"]
    rows.append(["mean foreground", m["dice"], m["hd"], m["hd95"], m["assd"], ""])
    parts.append("<h3>Segmentation (mean over cases; distances in mm)</h3>")
    parts.append(table(["class", "Dice", "HD", "HD95", "ASSD", "cases with inf"], rows))
    counts = report["counts"]
    parts.append(
        f'<p class="note">Cases with NaN (class absent in both): {counts["cases_with_nan"]}; with inf distances '
        f'(class absent in one): {counts["cases_with_inf"]}. NaN values are left out of the means, and counted; an inf distance makes its mean inf, so a missed structure is never hidden.</p>'
    )

    equal_mass = report.get("calibration_equal_mass")
    if equal_mass:
        parts.append(f'<p class="note">Equal-mass (adaptive) top-label ECE, all voxels: {fmt(equal_mass[ALL]["ece"])}.</p>')
    parts.append(protocol_html(report, table))
    parts.append(uncertainty_html(report, table, fmt, figure_uri))
    parts.append("<h2 id=\"reliability\">Reliability diagrams (top-label confidence)</h2><div class=\"figs\">")
    for region, r in cal.items():
        png = reliability_png([_curve(f"ECE {fmt(r['ece'], 3)}", r["reliability"])], f"{region} voxels", n_bins)
        parts.append(figure(png, f"{region}: ECE {fmt(r['ece'])}, {r['n_voxels']} voxels"))
    parts.append("</div><h2>Class-wise reliability (p_k against [y = k])</h2>")
    for region in cal:
        per_class = cal[region].get("classwise_reliability") or []
        if not per_class:
            continue
        parts.append(f"<h3>{region} voxels</h3><div class=\"figs\">")
        for k, bins in enumerate(per_class):
            name = names[k] if k < len(names) else str(k)
            cece_k = (cal[region].get("cece_per_class") or [None] * len(per_class))[k]
            png = reliability_png([_curve(name, bins, "frequency")], f"{region}: class {name}", n_bins)
            parts.append(figure(png, f"{name}: class-wise ECE {fmt(cece_k)}"))
        parts.append("</div>")

    parts.append('<h2 id="per-case">Per case</h2>')
    header = ["case"]
    for name in names[1:]:
        header += [f"Dice {name}", f"HD95 {name}"]
    header += [f"ECE {region}" for region in cal]
    rows = []
    for case in report["cases"]:
        row: list[Any] = [case["case"]]
        for c in case["classes"]:
            row += [c["dice"], c["hd95"]]
        ece = case.get("calibration", {}).get("ece", {})
        row += [ece.get(region) for region in cal]
        rows.append(row)
    parts.append(table(header, rows))
    parts.append(case_gallery_html(report, views or {}))
    return page("segcalib calibration report", "".join(parts))


def _temperature_text(meta: dict[str, Any]) -> str:
    t = meta.get("temperature")
    fit = meta.get("temperature_fit") or {}
    calibrator = meta.get("calibrator") or {}
    if calibrator.get("method"):
        how = ", chosen by cross-validation" if calibrator.get("selection") else ""
        value = f", T = {fmt(t)}" if t is not None else ""
        return f"calibrator {calibrator['method']}{how}, fitted on {calibrator.get('fit_region')} voxels{value}"
    if t is None:
        return "unknown (no export.json)"
    if fit.get("mode") == "fit":
        return f"T = {fmt(t)} fitted on {fit.get('voxels_used')} {fit.get('region')} validation voxels"
    return f"T = {fmt(t)} ({fit.get('mode', 'given')})"
