"""Export: calibrated probability maps as NIfTI in each input's own geometry."""

from segcalib.export.exporter import ExportOptions, ExportResult, export, output_paths

__all__ = ["ExportOptions", "ExportResult", "export", "output_paths"]
