"""Study v2 (``pipelines/calibration_study.py``): losses × seeds × regimes × post-hoc calibrators,
the calibrator and loss chosen by cross-validation over cases that are never test cases."""
