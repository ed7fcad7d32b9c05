"""Export: calibrated probability maps (one model or an ensemble) as NIfTI in each input's own
geometry; ``export.json`` records what produced them."""

from segcalib.export.exporter import ExportOptions, ExportResult, export, export_case
from segcalib.export.record import EXPORT_JSON
from segcalib.export.writers import output_paths

__all__ = ["EXPORT_JSON", "ExportOptions", "ExportResult", "export", "export_case", "output_paths"]
