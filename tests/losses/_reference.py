"""Independent float64 NumPy re-implementations of SPEC §1-2, written from the formulas.

They share nothing with ``segcalib.losses`` beyond the spec: plain loops over classes, explicit
one-hot targets, scipy's correlate for the spatial kernels.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage


def flat(z: np.ndarray) -> np.ndarray:
    """(B, C, *S) -> (M, C)."""
    return np.moveaxis(z, 1, -1).reshape(-1, z.shape[1]).astype(np.float64)


def log_softmax(zf: np.ndarray) -> np.ndarray:
    shifted = zf - zf.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _valid(y: np.ndarray, ignore_index: int) -> np.ndarray:
    return y.reshape(-1) != ignore_index


def _mean(values: np.ndarray, valid: np.ndarray) -> float:
    return float(values[valid].sum() / max(valid.sum(), 1))


def ce(z, y, ignore_index=-100) -> float:
    zf, yf, valid = flat(z), y.reshape(-1), _valid(y, ignore_index)
    lp = log_softmax(zf)
    nll = np.array([-lp[i, yf[i]] if valid[i] else 0.0 for i in range(len(yf))])
    return _mean(nll, valid)


def dice(z, y, include_background=True, ignore_index=-100, eps=1e-5) -> float:
    b, c = z.shape[:2]
    losses = []
    for s in range(b):
        zs = flat(z[s : s + 1])
        ys = y[s].reshape(-1)
        valid = ys != ignore_index
        p = np.exp(log_softmax(zs))[valid]
        g = np.stack([(ys[valid] == k).astype(np.float64) for k in range(c)], axis=1)
        for k in range(0 if include_background else 1, c):
            inter = (p[:, k] * g[:, k]).sum()
            losses.append(1 - (2 * inter + eps) / (p[:, k].sum() + g[:, k].sum() + eps))
    return float(np.mean(losses))


def focal(z, y, gamma=3.0, adaptive=False, ignore_index=-100) -> float:
    zf, yf, valid = flat(z), y.reshape(-1), _valid(y, ignore_index)
    lp = log_softmax(zf)
    out = np.zeros(len(yf))
    for i in np.flatnonzero(valid):
        py = math.exp(lp[i, yf[i]])
        g = 5.0 if (adaptive and py < 0.2) else gamma
        out[i] = -((1 - py) ** g) * lp[i, yf[i]]
    return _mean(out, valid)


def label_smoothing(z, y, epsilon=0.1, ignore_index=-100) -> float:
    zf, yf, valid = flat(z), y.reshape(-1), _valid(y, ignore_index)
    c = zf.shape[1]
    lp = log_softmax(zf)
    out = np.zeros(len(yf))
    for i in np.flatnonzero(valid):
        target = np.full(c, epsilon / c)
        target[yf[i]] += 1 - epsilon
        out[i] = -(target * lp[i]).sum()
    return _mean(out, valid)


def ecp(z, y, alpha=0.1, ignore_index=-100) -> float:
    zf, valid = flat(z), _valid(y, ignore_index)
    p = np.clip(np.exp(log_softmax(zf)), 1e-10, 1 - 1e-10)
    entropy = (-p * np.log(p)).mean(axis=1)  # divided by C
    return ce(z, y, ignore_index) - alpha * _mean(entropy, valid)


def logit_l1(z, y, alpha=0.01, ignore_index=-100) -> float:
    zf, valid = flat(z), _valid(y, ignore_index)
    return ce(z, y, ignore_index) + alpha * _mean(np.abs(zf).mean(axis=1), valid)


def distances(z) -> np.ndarray:
    zf = flat(z)
    return zf.max(axis=1, keepdims=True) - zf


def mbls_penalty(z, y, margin=10.0, ignore_index=-100) -> float:
    valid = _valid(y, ignore_index)
    return _mean(np.maximum(distances(z) - margin, 0).mean(axis=1), valid)


def mbls(z, y, margin=10.0, alpha=0.1, ignore_index=-100) -> float:
    return ce(z, y, ignore_index) + alpha * mbls_penalty(z, y, margin, ignore_index)


def penalty_and_derivative(kind: str, h, lam, rho):
    """P(h; lam, rho) and dP/dh, elementwise, branch by branch as SPEC §2 writes them."""
    h = np.asarray(h, dtype=np.float64)
    lam = np.broadcast_to(np.asarray(lam, dtype=np.float64), h.shape)
    rho = np.broadcast_to(np.asarray(rho, dtype=np.float64), h.shape)
    p = np.empty_like(h)
    dp = np.empty_like(h)
    for idx in np.ndindex(h.shape):
        hv, lv, rv = h[idx], lam[idx], rho[idx]
        if kind == "phr":
            x = lv + rv * hv
            p[idx] = (x * x - lv * lv) / (2 * rv) if x >= 0 else -lv * lv / (2 * rv)
            dp[idx] = x if x >= 0 else 0.0
        elif hv < 0:
            p[idx] = lv * hv / (1 - rv * hv)
            dp[idx] = lv / (1 - rv * hv) ** 2
        elif kind == "p2":
            p[idx] = lv * hv + lv * rv * hv**2 + rv**2 * hv**3 / 6
            dp[idx] = lv + 2 * lv * rv * hv + rv**2 * hv**2 / 2
        elif kind == "p3":
            p[idx] = lv * hv + lv * rv * hv**2
            dp[idx] = lv + 2 * lv * rv * hv
        else:
            raise ValueError(kind)
    return p, dp


def constraints(z, margin=10.0, normalize=True) -> np.ndarray:
    """h (M, C) of SPEC §2."""
    d = distances(z)
    return (d - margin) / margin if normalize else d - margin


def cals(z, y, lambdas, rhos, margin=10.0, penalty="phr", normalize=True, ignore_index=-100) -> float:
    valid = _valid(y, ignore_index)
    p, _ = penalty_and_derivative(penalty, constraints(z, margin, normalize), lambdas[None, :], rhos[None, :])
    return ce(z, y, ignore_index) + _mean(p.mean(axis=1), valid)


def cals_outer_update(
    val_logits_per_epoch,
    num_classes,
    margin=10.0,
    penalty="phr",
    normalize=True,
    lambda_min=1e-6,
    lambda_max=1e6,
    lambda_step=1,
    rho_init=1.0,
    rho_max=10.0,
    rho_step=10,
    gamma=1.2,
    tau=0.9,
):
    """Run SPEC §2's outer update over epochs; each entry is a list of validation logits arrays."""
    lam = np.full(num_classes, lambda_min)
    rho = np.full(num_classes, rho_init)
    c_prev = None
    history = []
    for epoch, batches in enumerate(val_logits_per_epoch, start=1):
        h = np.concatenate([constraints(b, margin, normalize) for b in batches])
        _, dp = penalty_and_derivative(penalty, h, lam[None, :], rho[None, :])
        new_lam = np.clip(np.clip(dp, lambda_min, lambda_max).mean(axis=0), lambda_min, lambda_max)
        c = h.mean(axis=0)
        if epoch % lambda_step == 0:
            lam = new_lam
        if rho_step > 0 and epoch % rho_step == 0 and c_prev is not None:
            rho = np.clip(np.where(c > tau * np.maximum(c_prev, 0), gamma * rho, rho), rho_init, rho_max)
        c_prev = c
        history.append((lam.copy(), rho.copy()))
    return history


def svls_kernel(dims: int, size: int = 3, sigma: float = 1.0) -> np.ndarray:
    k = np.zeros((size,) * dims)
    r = size // 2
    for idx in np.ndindex(k.shape):
        k[idx] = math.exp(-sum((i - r) ** 2 for i in idx) / (2 * sigma**2))
    centre = (r,) * dims
    k[centre] = 0.0
    k[centre] = k.sum()
    return k / k.sum()


def svls(z, y, size=3, sigma=1.0, ignore_index=-100) -> float:
    b, c = z.shape[:2]
    kernel = svls_kernel(z.ndim - 2, size, sigma)
    valid = (y != ignore_index).astype(np.float64)
    soft = np.zeros(z.shape)
    for s in range(b):
        norm = ndimage.correlate(valid[s], kernel, mode="nearest")
        for k in range(c):
            soft[s, k] = ndimage.correlate(((y[s] == k) * valid[s]).astype(np.float64), kernel, mode="nearest")
            soft[s, k] = np.where(valid[s] > 0, soft[s, k] / np.maximum(norm, 1e-300), 0.0)
    per_voxel = -(flat(soft) * log_softmax(flat(z))).sum(axis=1)
    return _mean(per_voxel, _valid(y, ignore_index))


def nacl(z, y, size=3, alpha=0.1, distance="l1", ignore_index=-100) -> float:
    """Box kernel, zero padding (outside and ignored voxels count as no class)."""
    b, c = z.shape[:2]
    kernel = np.full((size,) * (z.ndim - 2), 1.0 / size ** (z.ndim - 2))
    tau = np.zeros(z.shape)
    for s in range(b):
        for k in range(c):
            onehot = ((y[s] == k) & (y[s] != ignore_index)).astype(np.float64)
            tau[s, k] = ndimage.correlate(onehot, kernel, mode="constant", cval=0.0)
    gap = flat(tau) - flat(z)
    gap = np.abs(gap) if distance == "l1" else gap**2
    return ce(z, y, ignore_index) + alpha * _mean(gap.mean(axis=1), _valid(y, ignore_index))
