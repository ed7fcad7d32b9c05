"""Reports: evaluation of exported maps (report.json + report.html) and comparisons of runs.

The names load their modules on first use (PEP 562), so that the command line can read the
protocol presets without importing the evaluation's whole stack.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "compare": "segcalib.reports.compare",
    "find_reports": "segcalib.reports.compare",
    "evaluate": "segcalib.reports.evaluation",
    "read_report": "segcalib.reports.evaluation",
    "summarise": "segcalib.reports.evaluation",
}

__all__ = ["compare", "evaluate", "find_reports", "read_report", "summarise"]


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module 'segcalib.reports' has no attribute {name!r}")
    value = getattr(importlib.import_module(_NAMES[name]), name)
    globals()[name] = value  # after the import, which bound the submodule ``compare`` to this name
    return value
