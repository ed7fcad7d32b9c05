"""Parametric calibrators against independent float64 references (scipy L-BFGS-B with hand-written
gradients, another parametrisation), against Fiducio 0.2 on the same tensors, and their stated
(non-)preservation of the argmax, shown by hand-derived cases and hypothesis properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from segcalib.calibrators import build_calibrator, calibrator_class
from segcalib.calibrators.sample import StratifiedSample
from segcalib.errors import DataError
from segcalib.inference.temperature import fit_temperature
from segcalib.utils.tensors import flatten_classes
from tests.calibrators._helpers import mean_nll, miscalibrated

C = 3
SHAPE = (4, C, 10, 10, 8)  # 3200 voxels: the sample keeps all of them (weights 1)
ODIR = {"lambda_reg": 1e-2, "mu_reg": 1e-2}  # strong enough to matter in the comparison


# ----- the float64 reference: objective and gradient in numpy, for every parametrisation ----------
def _softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _log_softmax(a: np.ndarray) -> np.ndarray:
    a = a - a.max(axis=1, keepdims=True)
    return a - np.log(np.exp(a).sum(axis=1, keepdims=True))


class Reference:
    """``objective(theta) -> (value, gradient)`` of mean NLL + ODIR for one method on ``(N, C)`` data."""

    def __init__(self, method: str, z: np.ndarray, y: np.ndarray, lambda_reg: float = 0.0, mu_reg: float = 0.0):
        self.method, self.y, self.lam, self.mu = method, y, lambda_reg, mu_reg
        self.x = _log_softmax(z) if method == "dirichlet" else z
        self.onehot = np.eye(z.shape[1])[y]

    def start(self) -> np.ndarray:
        eye = np.eye(C)
        return {
            "temperature": np.ones(1),
            "class_temperature": np.ones(C),
            "vector": np.r_[np.ones(C), np.zeros(C)],
            "matrix": np.r_[eye.ravel(), np.zeros(C)],
            "dirichlet": np.r_[eye.ravel(), np.zeros(C)],
            "matrix_ti": np.r_[eye[:, :-1].ravel(), np.zeros(C), 1.0],  # C-1 free columns, bias, row sum
        }[self.method]

    def unpack(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(W, b)`` of ``out = x @ W.T + b`` (W diagonal for the scaling methods)."""
        m = self.method
        if m == "temperature":
            return np.eye(C) / theta[0], np.zeros(C)
        if m == "class_temperature":
            return np.diag(1 / theta), np.zeros(C)
        if m == "vector":
            return np.diag(theta[:C]), theta[C:]
        if m == "matrix_ti":
            v = theta[: C * (C - 1)].reshape(C, C - 1)
            return np.c_[v, theta[-1] - v.sum(axis=1)], theta[C * (C - 1) : -1]
        return theta[: C * C].reshape(C, C), theta[C * C :]

    def penalty(self, w: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        off = ~np.eye(C, dtype=bool)
        if self.method == "vector":
            d = np.diag(w) - 1
            value = self.lam * np.mean(d**2) + self.mu * np.mean(b**2)
            return value, np.diag(2 * self.lam * d / C), 2 * self.mu * b / C
        gw = np.where(off, 2 * self.lam * w / (C * (C - 1)), 0.0)
        return self.lam * np.mean(w[off] ** 2) + self.mu * np.mean(b**2), gw, 2 * self.mu * b / C

    def objective(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = self.unpack(theta)
        out = self.x @ w.T + b
        n = self.x.shape[0]
        nll = -np.mean(_log_softmax(out)[np.arange(n), self.y])
        g = (_softmax(out) - self.onehot) / n  # d mean NLL / d out
        regularised = self.method in ("vector", "matrix", "matrix_ti", "dirichlet")
        pen, pw, pb = self.penalty(w, b) if regularised else (0.0, 0 * w, 0 * b)
        gw, gb = g.T @ self.x + pw, g.sum(axis=0) + pb
        m = self.method
        if m == "temperature":
            grad = np.array([-np.sum(g * self.x) / theta[0] ** 2])
        elif m == "class_temperature":
            grad = -np.sum(g * self.x, axis=0) / theta**2
        elif m == "vector":
            grad = np.r_[np.diag(gw), gb]
        elif m == "matrix_ti":
            grad = np.r_[(gw[:, :-1] - gw[:, -1:]).ravel(), gb, gw[:, -1].sum()]
        else:
            grad = np.r_[gw.ravel(), gb]
        return nll + pen, grad

    def fit(self) -> float:
        bounds = [(1e-2, 1e2)] * C if self.method == "class_temperature" else None
        if self.method == "temperature":
            bounds = [(1e-2, 1e2)]
        result = minimize(self.objective, self.start(), jac=True, method="L-BFGS-B", bounds=bounds,
                          options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-11})
        return float(result.fun)

    def value_at(self, cal) -> float:
        """The reference objective at segcalib's fitted parameters."""
        p = cal.get_params()
        m = self.method
        if m == "temperature":
            theta = np.array([p["temperature"]])
        elif m == "class_temperature":
            theta = np.array(p["temperatures"])
        elif m == "vector":
            theta = np.r_[p["weight"], p["bias"]]
        elif m == "matrix_ti":
            w = np.array(p["weight"])
            theta = np.r_[w[:, :-1].ravel(), p["bias"], w[0].sum()]
        else:
            theta = np.r_[np.array(p["weight"]).ravel(), p["bias"]]
        return self.objective(theta)[0]


def _data(seed: int = 0):
    logits, target, _ = miscalibrated(SHAPE, seed=seed)
    return logits, target


@pytest.mark.parametrize(
    ("method", "reg"),
    [(m, {}) for m in ("temperature", "class_temperature", "vector", "matrix", "matrix_ti", "dirichlet")]
    + [(m, ODIR) for m in ("vector", "matrix", "matrix_ti", "dirichlet")],
    ids=lambda v: ("odir" if v else "noreg") if isinstance(v, dict) else v,
)
def test_fit_matches_float64_reference(method: str, reg: dict) -> None:
    logits, target = _data()
    zero = {"lambda_reg": 0.0, "mu_reg": 0.0} if method in ("matrix", "matrix_ti", "dirichlet") else {}
    params = reg or zero
    cal = build_calibrator(method, C, **params)
    cal.update(logits, target)
    cal.fit()
    ref = Reference(method, flatten_classes(logits).double().numpy(), target.reshape(-1).numpy(), **reg)
    best = ref.fit()
    ours = ref.value_at(cal)
    assert ours <= best * (1 + 1e-3) and ours >= best * (1 - 1e-3), (ours, best)
    # the fit actually improves on the identity map (the data are miscalibrated)
    assert best < ref.objective(ref.start())[0] * 0.98


def test_weighted_fit_matches_reference_on_the_same_sample() -> None:
    """With a sample smaller than the data, the fit minimises the weighted NLL of that sample
    (a hand-written weighted objective and gradient, optimised by scipy)."""
    logits, target = _data(seed=1)
    cal = build_calibrator("matrix", C, max_voxels=600, lambda_reg=0.0, mu_reg=0.0)
    cal.update(logits, target)
    cal.fit()
    z, y, w = cal.sample.data()
    y, w = y.long(), w.double()
    assert len(torch.unique(w)) > 1  # the classes are kept at different rates
    ref = Reference("matrix", z.double().numpy(), y.numpy())
    theta = minimize(
        lambda t: _weighted_objective(ref, t, w.numpy()), ref.start(), jac=True, method="L-BFGS-B",
        options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-11},
    )
    p = cal.get_params()
    ours = _weighted_objective(ref, np.r_[np.array(p["weight"]).ravel(), p["bias"]], w.numpy())[0]
    assert abs(ours - theta.fun) <= 1e-3 * theta.fun


def _weighted_objective(ref: Reference, theta: np.ndarray, weights: np.ndarray) -> tuple[float, np.ndarray]:
    w_, b = ref.unpack(theta)
    out = ref.x @ w_.T + b
    q = weights / weights.sum()
    onehot = np.eye(C)[ref.y]
    value = -np.sum(q * _log_softmax(out)[np.arange(len(ref.y)), ref.y])
    g = (_softmax(out) - onehot) * q[:, None]
    return value, np.r_[(g.T @ ref.x).ravel(), g.sum(axis=0)]


def test_temperature_agrees_with_inference_fit_temperature() -> None:
    logits, target = _data(seed=2)
    cal = build_calibrator("temperature", C)
    cal.update(logits, target)
    z, y = flatten_classes(logits).double(), target.reshape(-1)
    expected = fit_temperature(z, y)
    ours = cal.fit().get_params()["temperature"]
    assert ours == pytest.approx(expected, rel=1e-3)
    assert expected > 1.5  # the synthetic logits are over-confident by 2.5x
    # the tighter float64 tolerances here give an NLL at least as low as the inference helper's
    nll = torch.nn.functional.cross_entropy
    assert float(nll(z / ours, y)) <= float(nll(z / expected, y)) + 1e-12


def test_stratified_sample_weights_estimate_the_population_nll() -> None:
    logits, target = _data(seed=3)
    target[:, :, :2] = 2  # make class 2 common and the others rarer
    sample = StratifiedSample(C, max_voxels=450, seed=0)
    for b in range(logits.shape[0]):
        sample.add(logits[b : b + 1], target[b : b + 1])
    z, y, w = sample.data()
    assert y.dtype == torch.int16 and w.dtype == torch.float32  # compact: the fit promotes chunk by chunk
    y, w = y.long(), w.double()
    counts = torch.bincount(target.reshape(-1), minlength=C)
    assert torch.equal(sample.offered, counts)
    kept = torch.bincount(y, minlength=C)
    assert torch.equal(kept, counts.clamp(max=150))  # max_voxels // C slots per class
    assert float(w.sum()) == pytest.approx(float(counts.sum()))
    nll = torch.nn.functional.cross_entropy(z.double(), y, reduction="none")
    population = float(torch.nn.functional.cross_entropy(flatten_classes(logits).double(), target.reshape(-1)))
    assert float((nll * w).sum() / w.sum()) == pytest.approx(population, rel=0.1)


# ----- Fiducio 0.2 on the same tensors ------------------------------------------------------------------
FIDUCIO = {
    "temperature": "TemperatureScaling",
    "vector": "VectorScaling",
    "matrix": "MatrixScaling",
    "matrix_ti": "TranslationInvariantMatrixScaling",
    "dirichlet": "DirichletCalibration",
}


@pytest.mark.parametrize("method", sorted(FIDUCIO))
def test_nll_at_most_fiducio(method: str) -> None:
    """Same calibration tensors, same held-out tensors. Defaults differ: Fiducio fits by Adam (lr 0.1,
    200 steps, float32) with no regulariser; segcalib by float64 L-BFGS, and matrix/dirichlet default to
    ODIR 1e-4. So the fitted-NLL comparison uses equal (zero) regularisation, the held-out one defaults."""
    fiducio = pytest.importorskip("fiducio")
    logits, target = _data(seed=4)
    test_logits, test_target = _data(seed=5)
    zero = {"lambda_reg": 0.0, "mu_reg": 0.0} if method != "temperature" else {}
    ours = build_calibrator(method, C, **zero)
    ours.update(logits, target)
    ours.fit()
    theirs = getattr(fiducio, FIDUCIO[method])().fit(logits, target)
    fitted_ours, fitted_theirs = mean_nll(ours.transform(logits), target), mean_nll(theirs.transform(logits), target)
    assert fitted_ours <= fitted_theirs * 1.01, (fitted_ours, fitted_theirs)
    default = build_calibrator(method, C)
    default.update(logits, target)
    default.fit()
    held_ours = mean_nll(default.transform(test_logits), test_target)
    held_theirs = mean_nll(theirs.transform(test_logits), test_target)
    assert held_ours <= held_theirs * 1.01, (held_ours, held_theirs)


# ----- what each map preserves -------------------------------------------------------------------------
def _z(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(1, C, 1, 1)


SWAP = [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]  # rows sum to 1: also translation invariant


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("vector", {"weight": [1.0, 3.0, 1.0], "bias": [0.0, 0.0, 0.0]}),  # (2, 1, 0) -> (2, 3, 0)
        ("vector", {"weight": [1.0, 1.0, 1.0], "bias": [0.0, 1.5, 0.0]}),  # (2, 1, 0) -> (2, 2.5, 0)
        ("class_temperature", {"temperatures": [2.0, 0.5, 1.0]}),  # (2, 1, 0) -> (1, 2, 0)
        ("matrix", {"weight": SWAP, "bias": [0.0, 0.0, 0.0]}),
        ("matrix_ti", {"weight": SWAP, "bias": [0.0, 0.0, 0.0]}),
        ("dirichlet", {"weight": SWAP, "bias": [0.0, 0.0, 0.0]}),
    ],
)
def test_methods_that_do_not_claim_argmax_preservation_can_change_it(method: str, params: dict) -> None:
    assert not calibrator_class(method).preserves_argmax
    cal = calibrator_class(method).from_params(C, params)
    assert int(cal.transform(_z(2.0, 1.0, 0.0)).argmax(dim=1)) == 1


_LOGITS = st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=C, max_size=C)


@settings(max_examples=60, deadline=None)
@given(z=_LOGITS, t=st.floats(1e-2, 1e2), shift=st.floats(-50, 50))
def test_temperature_preserves_order_for_every_t_and_ignores_logit_offsets(z, t, shift) -> None:
    cal = calibrator_class("temperature").from_params(C, {"temperature": t})
    x = _z(*z)
    p = cal.transform(x)[0, :, 0, 0]
    order = x[0, :, 0, 0].argsort()
    assert (p[order].diff() >= 0).all()
    # x + shift is rounded to float32 (~6e-8 relative) before the division by t amplifies it
    atol = 2e-6 * (1 + abs(shift)) + 1.2e-7 * (20 + abs(shift)) / t
    torch.testing.assert_close(cal.transform(x + shift), cal.transform(x), rtol=0, atol=atol)


@settings(max_examples=60, deadline=None)
@given(
    z=_LOGITS,
    k=st.integers(0, C - 1),
    step=st.floats(0.01, 5),
    scales=st.lists(st.floats(0.05, 5), min_size=C, max_size=C),
    bias=st.lists(st.floats(-3, 3), min_size=C, max_size=C),
)
def test_positive_scales_make_p_k_increase_with_z_k(z, k, step, scales, bias) -> None:
    """What vector scaling with w > 0 and class-wise temperature do preserve: raising z_k alone never lowers p_k."""
    x = _z(*z)
    y = x.clone()
    y[0, k] += step
    for cal in (
        calibrator_class("vector").from_params(C, {"weight": scales, "bias": bias}),
        calibrator_class("class_temperature").from_params(C, {"temperatures": scales}),
    ):
        assert cal.transform(y)[0, k] >= cal.transform(x)[0, k] - 1e-6


@settings(max_examples=40, deadline=None)
@given(z=_LOGITS, shift=st.floats(-20, 20))
def test_fitted_matrix_ti_and_dirichlet_ignore_logit_offsets(z, shift) -> None:
    for method in ("matrix_ti", "dirichlet"):
        cal = _fitted(method)
        x = _z(*z)
        torch.testing.assert_close(cal.transform(x + shift), cal.transform(x), rtol=0, atol=1e-4)


def test_full_matrix_is_not_translation_invariant() -> None:
    cal = calibrator_class("matrix").from_params(C, {"weight": [[2.0, 0, 0], [0, 1, 0], [0, 0, 1]], "bias": [0.0] * 3})
    x = _z(0.0, 0.0, 0.0)
    assert (cal.transform(x + 1.0) - cal.transform(x)).abs().max() > 0.1  # (2, 1, 1) vs (0, 0, 0)


_FITTED: dict = {}


def _fitted(method: str):
    if method not in _FITTED:
        cal = build_calibrator(method, C)
        cal.update(*_data(seed=6))
        _FITTED[method] = cal.fit()
    return _FITTED[method]


@pytest.mark.parametrize("method", ["temperature", "class_temperature", "vector", "matrix", "matrix_ti", "dirichlet"])
def test_non_finite_logits_in_the_region_are_a_data_error(method: str) -> None:
    logits, target = _data(seed=7)
    logits[0, 1, 2, 3, 4] = float("nan")
    cal = build_calibrator(method, C)
    cal.update(logits, target)
    with pytest.raises(DataError, match=f"calibrator '{method}': the fit region holds non-finite logits"):
        cal.fit()
    mask = torch.ones_like(target, dtype=torch.bool)
    mask[0, 2, 3, 4] = False  # the same voxel outside the region: fine
    cal.reset()
    cal.update(logits, target, mask)
    assert torch.isfinite(cal.fit().transform(logits[1:])).all()


def test_weights_keep_a_class_stratified_fit_close_to_the_full_fit() -> None:
    """85 % background with large, honest margins, foreground over-confident: the sample keeps 200 voxels
    per class, so unweighted it over-represents the foreground 5-fold; the weights undo that."""
    gen = torch.Generator().manual_seed(0)
    n = 40_000
    y = torch.multinomial(torch.tensor([0.85, 0.10, 0.05]), n, replacement=True, generator=gen)
    u = torch.randn(n, C, generator=gen)
    u[torch.arange(n), y] += torch.where(y == 0, 4.0, 1.0)
    z = u * torch.where(y == 0, 1.0, 3.0)[:, None]
    full = fit_temperature(z.double(), y)
    cal = build_calibrator("temperature", C, max_voxels=600)
    cal.update(z.T.reshape(1, C, n), y.reshape(1, n))
    sampled = cal.fit().get_params()["temperature"]
    kept, labels, _ = cal.sample.data()
    unweighted = fit_temperature(kept.double(), labels.long())
    assert sampled == pytest.approx(full, rel=0.03)
    assert abs(unweighted - full) > 0.5  # what the weights are for
