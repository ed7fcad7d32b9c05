"""CRC and Learn-then-Test against a hand-derived case, MAPIE (recall control, each voxel a
label) and a float64 reference of the Hoeffding–Bentkus p-value written from the paper."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from segcalib.conformal.control import (
    check_level,
    crc_index,
    crc_min_cases,
    fixed_sequence,
    hb_p_values,
    ltt_min_cases,
)
from segcalib.conformal.grids import threshold_grid
from segcalib.conformal.statistics import RiskSums, threshold_counts
from segcalib.errors import ConfigError
from tests.conformal._synthetic import synthetic_case


def test_crc_index_on_a_hand_derived_case() -> None:
    losses = np.array([[1, .5, .2, 0, 0], [1, .6, .1, .1, 0], [1, .4, .3, 0, 0], [1, .5, 0, 0, 0]])
    mean = losses.mean(0)  # 1, .5, .15, .025, 0 -> (4 R + 1) / 5 = 1, .6, .32, .22, .2
    assert crc_index(mean, 4, 0.25) == 3
    assert crc_index(mean, 4, 0.32) == 2
    assert crc_index(mean, 4, 0.2) == 4  # only the whole image: 1/(n+1) = alpha
    assert crc_index(mean, 4, 0.19) is None  # too few cases for this alpha
    assert crc_min_cases(0.2) == 4 and crc_min_cases(0.1) == 9 and crc_min_cases(0.05) == 19


def test_fixed_sequence_stops_at_the_first_p_value_above_delta() -> None:
    assert fixed_sequence(np.array([0.01, 0.02, 0.2, 0.01]), 0.05) == 1
    assert fixed_sequence(np.array([0.06, 0.01]), 0.05) is None
    assert fixed_sequence(np.array([0.01, 0.01]), 0.05) == 1
    assert ltt_min_cases(0.1, 0.1) == 22  # 0.9^22 = 0.098 <= 0.1 < 0.9^21
    assert 0.9**22 <= 0.1 < 0.9**21


def _hb_reference(r_hat: float, n: int, alpha: float) -> float:
    """Learn then Test (Angelopoulos et al. 2021), Prop. 3.5: the Hoeffding–Bentkus p-value,
    with the binomial tail summed term by term (math.comb, math.fsum), not from scipy."""
    a = min(r_hat, alpha)
    h1 = (a * math.log(a / alpha) if a > 0 else 0.0) + (1 - a) * math.log((1 - a) / (1 - alpha))
    hoeffding = math.exp(-n * h1)
    k_max = math.ceil(n * r_hat)
    tail = math.fsum(math.comb(n, k) * alpha**k * (1 - alpha) ** (n - k) for k in range(0, min(k_max, n) + 1))
    return min(hoeffding, math.e * tail, 1.0)


@pytest.mark.parametrize("n,alpha", [(16, 0.1), (36, 0.2), (100, 0.05), (500, 0.1)])
def test_hb_p_values_equal_a_float64_reference_from_the_paper(n: int, alpha: float) -> None:
    r_hat = np.concatenate([[0.0, 1.0, alpha], np.random.default_rng(n).uniform(0, 0.4, 40)])
    got = hb_p_values(r_hat, n, alpha)
    expected = np.array([_hb_reference(float(r), n, alpha) for r in r_hat])
    np.testing.assert_allclose(got, expected, rtol=1e-11, atol=1e-300)
    assert got[0] == pytest.approx((1 - alpha) ** n, rel=1e-12)  # zero risk: the Hoeffding term


def test_hb_p_values_equal_mapie() -> None:
    from mapie.risk_control.methods import compute_hoeffding_bentkus_p_value

    r_hat = np.random.default_rng(0).uniform(0, 0.5, 200)
    for n, alpha in ((20, 0.1), (80, 0.2)):
        np.testing.assert_allclose(hb_p_values(r_hat, n, alpha),
                                   compute_hoeffding_bentkus_p_value(r_hat, n, alpha)[:, 0], rtol=1e-12)


def _flattened_cases(n_cases: int) -> tuple[np.ndarray, np.ndarray]:
    """``(probs (n, V) float64, labels (n, V) int)`` of class 1 of synthetic volumes (cases that
    contain the class; each voxel one label of a multi-label sample)."""
    probs, labels = [], []
    seed = 0
    while len(probs) < n_cases:
        p, label = synthetic_case(seed)
        seed += 1
        if (label == 1).any():
            probs.append(p[1].astype(np.float64).ravel())
            labels.append((label == 1).astype(int).ravel())
    return np.array(probs), np.array(labels)


def test_fnr_threshold_equals_mapie_crc_for_recall() -> None:
    from mapie.risk_control import MultiLabelClassificationController

    alphas = (0.05, 0.1, 0.2)
    probs, labels = _flattened_cases(40)
    grid = threshold_grid()[::10]  # descending; MAPIE's predict_params ascend (risk grows with them)
    assert not np.isin(probs, grid).any()  # no ties: MAPIE keeps p > t, segcalib p >= t
    sums = RiskSums("fnr", len(grid))
    for i in range(len(probs)):
        sums.add(str(i), threshold_counts(probs[i], labels[i].astype(bool), grid))
    controller = MultiLabelClassificationController(
        predict_function=lambda X: probs[np.asarray(X).ravel()], risk="recall", method="crc",
        target_level=[1 - a for a in alphas], predict_params=grid[::-1].copy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        controller.calibrate(np.arange(len(probs))[:, None], labels)
    np.testing.assert_allclose(controller.r_hat[::-1], sums.mean_loss(), atol=1e-12)  # same per-case risks
    for alpha, mapie_threshold in zip(alphas, controller.best_predict_param):
        j = crc_index(sums.mean_loss(), sums.n, alpha)
        assert 0 < j < len(grid) - 1  # a non-trivial threshold
        assert mapie_threshold == grid[j], alpha


def test_levels_outside_the_open_unit_interval_are_refused() -> None:
    for bad in (0, 1, 1.5, -0.1, float("nan"), "x"):
        with pytest.raises(ConfigError, match="alpha"):
            check_level("alpha", bad)
    assert check_level("alpha", "0.1") == 0.1
