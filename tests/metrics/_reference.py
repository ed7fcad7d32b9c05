"""Independent float64 NumPy/SciPy references for the metrics (plain loops, no segcalib code)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def ref_bin(p: np.ndarray, n_bins: int) -> np.ndarray:
    """SPEC §3 bin index in float64."""
    return np.clip(np.ceil(np.asarray(p, dtype=np.float64) * n_bins) - 1, 0, n_bins - 1).astype(np.int64)


def _ece_from_samples(conf: np.ndarray, hit: np.ndarray, n_bins: int) -> dict:
    """ECE / MCE / reliability with a Python loop over bins."""
    n = conf.size
    bins = ref_bin(conf, n_bins)
    ece, mce = 0.0, -np.inf
    confidence, accuracy, count = [], [], []
    for b in range(n_bins):
        sel = bins == b
        nb = int(sel.sum())
        count.append(nb)
        if nb == 0:
            confidence.append(np.nan)
            accuracy.append(np.nan)
            continue
        cb, ab = conf[sel].mean(), hit[sel].mean()
        confidence.append(cb)
        accuracy.append(ab)
        ece += nb / n * abs(ab - cb)
        mce = max(mce, abs(ab - cb))
    if n == 0:
        ece, mce = np.nan, np.nan
    return {"ece": ece, "mce": mce if np.isfinite(mce) else np.nan, "confidence": confidence, "accuracy": accuracy, "count": count}


def ref_calibration(
    probs: np.ndarray,
    target: np.ndarray,
    n_bins: int = 15,
    mask: np.ndarray | None = None,
    include_background: bool = True,
    eps: float = 1e-12,
) -> dict:
    """Pooled calibration metrics of ``probs (B, C, *S)`` against ``target (B, *S)`` on ``mask``."""
    probs = np.asarray(probs, dtype=np.float64)
    c = probs.shape[1]
    p = np.moveaxis(probs, 1, -1).reshape(-1, c)
    y = np.asarray(target).reshape(-1)
    if mask is not None:
        keep = np.asarray(mask).reshape(-1)
        p, y = p[keep], y[keep]
    n = y.size
    conf = p.max(1) if n else np.zeros(0)
    pred = p.argmax(1) if n else np.zeros(0, dtype=int)
    top = _ece_from_samples(conf, (pred == y).astype(np.float64), n_bins)
    per_class = []
    for k in range(c):
        per_class.append(_ece_from_samples(p[:, k], (y == k).astype(np.float64), n_bins)["ece"])
    first = 0 if include_background else 1
    onehot = np.eye(c)[y] if n else np.zeros((0, c))
    p_true = p[np.arange(n), y] if n else np.zeros(0)
    return {
        "ece": top["ece"],
        "mce": top["mce"],
        "cece": float(np.mean(per_class[first:])),
        "cece_per_class": per_class,
        "nll": float(np.mean(-np.log(np.maximum(p_true, eps)))) if n else np.nan,
        "brier": float(np.mean(((p - onehot) ** 2).sum(1))) if n else np.nan,
        "n_voxels": n,
        "reliability": {"confidence": top["confidence"], "accuracy": top["accuracy"], "count": top["count"]},
    }


def ref_edges(mask: np.ndarray) -> np.ndarray:
    """``mask XOR binary_erosion(mask)`` with scipy's default cross element and border 0."""
    mask = np.asarray(mask, dtype=bool)
    return mask ^ ndimage.binary_erosion(mask)


def ref_boundary_band(labels: np.ndarray, spacing, width: float, classes=None) -> np.ndarray:
    """Voxels within ``width`` mm of an edge voxel of any foreground class (scipy EDT)."""
    edges = np.zeros(labels.shape, dtype=bool)
    for k in np.unique(labels) if classes is None else classes:
        if k != 0:
            edges |= ref_edges(labels == k)
    if not edges.any():
        return np.zeros(labels.shape, dtype=bool)
    return ndimage.distance_transform_edt(~edges, sampling=spacing) <= width


def ref_surface(pred: np.ndarray, gt: np.ndarray, spacing, q: float = 95.0, pooled: bool = False) -> dict:
    """HD / HD-q / ASSD with full-volume scipy EDTs (no cropping)."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if not pred.any() and not gt.any():
        return {"hd": np.nan, "hd95": np.nan, "assd": np.nan}
    if not pred.any() or not gt.any():
        return {"hd": np.inf, "hd95": np.inf, "assd": np.inf}
    ep, eg = ref_edges(pred), ref_edges(gt)
    d_pg = ndimage.distance_transform_edt(~eg, sampling=spacing)[ep]
    d_gp = ndimage.distance_transform_edt(~ep, sampling=spacing)[eg]
    both = np.concatenate([d_pg, d_gp])
    hdq = np.percentile(both, q) if pooled else max(np.percentile(d_pg, q), np.percentile(d_gp, q))
    return {"hd": float(both.max()), "hd95": float(hdq), "assd": float(both.mean())}


def ref_dice(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
    out = np.full(num_classes, np.nan)
    for k in range(num_classes):
        p, g = pred == k, gt == k
        if p.sum() + g.sum() > 0:
            out[k] = 2.0 * (p & g).sum() / (p.sum() + g.sum())
    return out


def blobs(shape, num_classes: int, rng: np.random.Generator, coarse: int = 4) -> np.ndarray:
    """Label map with a few smooth blobs per class (argmax of upsampled noise)."""
    noise = rng.standard_normal((num_classes,) + tuple(max(2, s // coarse) for s in shape))
    zoom = [1] + [s / n for s, n in zip(shape, noise.shape[1:])]
    field = ndimage.zoom(noise, zoom, order=1)
    field = field[(slice(None),) + tuple(slice(0, s) for s in shape)]
    return field.argmax(0)
