"""Reports: evaluation of exported maps (report.json + report.html) and comparisons of runs."""

from segcalib.reports.compare import compare, find_reports
from segcalib.reports.evaluation import evaluate, read_report, summarise

__all__ = ["compare", "evaluate", "find_reports", "read_report", "summarise"]
