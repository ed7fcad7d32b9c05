"""A report of many small cases stays small: the per-case views are palette PNG thumbnails."""

from __future__ import annotations

import math

import numpy as np

from segcalib.reports.html_sections import case_gallery_html
from segcalib.reports.slices import case_view_uri
from tests.synthetic import blob_case

BUDGET_300_CASES = 30e6  # bytes, issue 16


def test_case_views_of_300_small_cases_fit_in_30_mb() -> None:
    rng = np.random.default_rng(0)
    views, cases = {}, []
    n = 12
    for i in range(n):
        image, label = blob_case((36, 50, 35), seed=i)  # hippocampus-sized
        pred = np.where(rng.random(label.shape) < 0.1, 0, label)
        fg = np.clip(label / 2 + rng.normal(0, 0.1, label.shape), 0, 1).astype(np.float32)
        noise = rng.uniform(0, math.log(3), label.shape).astype(np.float32)  # noise: the worst case for PNG
        views[f"c{i}"] = case_view_uri(image, np.eye(4), label, pred, fg, noise, uncertainty_range=(0, math.log(3)))
        cases.append({"case": f"c{i}", "classes": [{"class": 1, "dice": float(rng.random()), "hd95": 1.0}]})
    html = case_gallery_html({"cases": cases}, views)
    assert html.count("<details") == n and html.count("data:image/png;base64,") == n
    per_case = len(html.encode()) / n
    assert 20e3 < per_case < 0.9 * BUDGET_300_CASES / 300  # leaves 10 % for tables and figures
