"""Conformal risk control for segmentation masks: thresholds and margins with a finite-sample
guarantee over cases, for any model's probability maps (``segcalib conformal fit / apply``).

>>> record = fit_conformal("val_maps", "dataset.json", "conf", ConformalOptions(risk="fnr", alpha=0.1))
>>> apply_conformal("conf", "test_maps", "masks")   # <case>_conformal.nii.gz per case

See docs/conformal.md for what the guarantee says and does not say.
"""

from segcalib.conformal.apply import apply_conformal
from segcalib.conformal.control import crc_index, fixed_sequence, hb_p_values
from segcalib.conformal.fit import ConformalOptions, fit_conformal
from segcalib.conformal.grids import radius_grid, threshold_grid
from segcalib.conformal.record import CONFORMAL_JSON, read_record
from segcalib.conformal.statistics import RISKS, CaseCounts, RiskSums, margin_counts, threshold_counts

__all__ = [
    "CONFORMAL_JSON",
    "RISKS",
    "CaseCounts",
    "ConformalOptions",
    "RiskSums",
    "apply_conformal",
    "crc_index",
    "fit_conformal",
    "fixed_sequence",
    "hb_p_values",
    "margin_counts",
    "radius_grid",
    "read_record",
    "threshold_counts",
    "threshold_grid",
]
