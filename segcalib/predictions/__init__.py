"""Prediction maps of any segmentation model (segcalib export, nnU-Net v2, 4D NIfTI), one case at a time.

>>> folder = open_predictions("nnunet_out")            # format detected from the content
>>> for case, entry in match_cases(folder, manifest.labelled("validation")):
...     pred = folder.read(case.case_id)                # values (C, *spatial) float32, kind
...     check_geometry(pred, read_header(case.label))
"""

from segcalib.predictions.folder import FORMATS, PredictionEntry, PredictionFolder, detect_format, open_predictions
from segcalib.predictions.formats import PREDICTION_FORMATS, PredictionFormat, register_format
from segcalib.predictions.maps import INPUTS, PredictionMap, is_probabilities, probability_error, resolve_kind
from segcalib.predictions.matching import check_geometry, match_cases
from segcalib.predictions.readers import read_nifti_map, read_nnunet_map

__all__ = [
    "FORMATS",
    "INPUTS",
    "PREDICTION_FORMATS",
    "PredictionEntry",
    "PredictionFolder",
    "PredictionFormat",
    "PredictionMap",
    "check_geometry",
    "detect_format",
    "is_probabilities",
    "match_cases",
    "open_predictions",
    "probability_error",
    "read_nifti_map",
    "read_nnunet_map",
    "register_format",
    "resolve_kind",
]
