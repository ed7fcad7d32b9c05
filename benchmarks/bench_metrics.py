"""Side-by-side timings of segcalib's metrics against torchmetrics, MONAI and scipy references.

Run: ``python -m benchmarks.bench_metrics --sizes 128 256`` (CPU with 2 threads by default; a GPU
section is added when CUDA is available). Inputs per size S: 4 classes, probabilities from
smooth random logits (a few blobs per class), a ground truth that disagrees with the prediction
near boundaries, anisotropic spacing 1.0 x 0.8 x 2.5 mm. Every comparison also checks that the
values agree. Times are the best of a few runs (ours and the reference alternate), since on a
shared machine other processes only ever add time; the slow references run once.

Rows (ratio = reference time / our time, > 1 means we are faster):
- ``ece``: ``expected_calibration_error`` vs torchmetrics ``MulticlassCalibrationError(num_classes=4,
  n_bins=15, norm="l1")``;
- ``cece``: ``classwise_calibration_error`` vs MONAI ``CalibrationErrorMetric(num_bins=15)``
  (its one-hot target is built outside the timed call);
- ``calibration_update``: a full ``CalibrationMetric.update`` (all, foreground, boundary regions:
  ECE/MCE/CECE/NLL/Brier/reliability statistics, boundary band included);
- ``hd95``: ``surface_distances`` for classes 1..3 vs MONAI ``compute_hausdorff_distance(
  percentile=95)`` and a scipy ``distance_transform_edt`` reference on the full volume.

``--update-paths 128 --baseline REV`` prints instead one ``update``'s time, kernel count, host
syncs and ``bincount`` calls (torch profiler) on the CPU path and on the device path, for this
checkout and for git revision ``REV`` side by side.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from segcalib.metrics import (
    CalibrationMetric,
    classwise_calibration_error,
    expected_calibration_error,
    surface_distances_per_class,
)

NUM_CLASSES = 4
N_BINS = 15
SPACING = (1.0, 0.8, 2.5)
PAUSE_S = 0.05


def make_inputs(size: int, seed: int = 0, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``probs (1, 4, S, S, S)`` float32, ground truth and prediction label maps ``(1, S, S, S)``."""
    gen = torch.Generator().manual_seed(seed)
    coarse = max(size // 32, 2)

    def field(scale: float) -> torch.Tensor:
        x = torch.randn(1, NUM_CLASSES, coarse, coarse, coarse, generator=gen) * scale
        return F.interpolate(x, size=(size,) * 3, mode="trilinear", align_corners=False)

    logits = field(6.0)
    probs = logits.softmax(1).contiguous()
    gt = (logits + field(2.0)).argmax(1)
    pred = probs.argmax(1)
    return probs.to(device), gt.to(device), pred.to(device)


def timed(
    fn: Callable[[], Any], repeats: int, sync: Callable[[], None] = lambda: None, warmup: bool = True
) -> tuple[float, Any]:
    """Best wall time (s) of ``repeats`` runs (after one untimed warm-up run), and the last value.

    The minimum, not the median: on a shared machine other processes only ever add time. Each
    run starts after a short pause, so that no OpenMP team left spinning by the previous call
    (torch's libgomp spins for a few ms after each parallel region) competes with it.
    """
    if warmup:
        fn()
        sync()
    times, value = [], None
    for _ in range(repeats):
        time.sleep(PAUSE_S)
        start = time.perf_counter()
        value = fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times), value


def timed_pair(
    ours: Callable[[], Any], reference: Callable[[], Any], repeats: int
) -> tuple[float, Any, float, Any]:
    """:func:`timed` for two functions, alternating their runs so that both see the same load."""
    ours()
    reference()
    t_ours, t_ref, v_ours, v_ref = [], [], None, None
    for _ in range(repeats):
        t, v_ours = timed(ours, 1, warmup=False)
        t_ours.append(t)
        t, v_ref = timed(reference, 1, warmup=False)
        t_ref.append(t)
    return min(t_ours), v_ours, min(t_ref), v_ref


# ops that only make views or allocate: not counted as kernels
_NOT_KERNELS = frozenset(
    "aten::" + name
    for name in (
        "as_strided view reshape slice narrow unsqueeze squeeze permute alias expand expand_as _unsafe_view select "
        "transpose t detach resolve_conj resolve_neg empty empty_strided empty_like resize_ lift_fresh "
        "_reshape_alias view_as_real view_as_complex split unbind to _to_copy contiguous clone"
    ).split()
)


def count_kernels(fn: Callable[[], Any], leaves_only: bool = True) -> Counter:
    """The aten ops one call of ``fn`` runs that do work (torch profiler, CPU activity): leaf ops,
    views and allocations left out -- on a GPU, each would be a kernel launch (``leaves_only=False``:
    every aten op, nested ones included)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()

    def works(event: Any) -> bool:
        return event.name.startswith("aten::") and event.name not in _NOT_KERNELS

    if not leaves_only:
        return Counter(e.name for e in prof.events() if e.name.startswith("aten::"))
    return Counter(e.name for e in prof.events() if works(e) and not any(works(c) for c in e.cpu_children))


def _onehot(labels: torch.Tensor) -> torch.Tensor:
    return F.one_hot(labels, NUM_CLASSES).movedim(-1, 1).float()


def _float64_ece(probs: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """Float64 NumPy top-label ECE and class-wise ECE (SPEC binning), for the value checks."""
    p = probs.double().movedim(1, -1).reshape(-1, NUM_CLASSES).numpy()
    y = target.reshape(-1).numpy()

    def ece(values: np.ndarray, hits: np.ndarray) -> float:
        bins = np.clip(np.ceil(values * N_BINS) - 1, 0, N_BINS - 1).astype(np.int64)
        gap = np.bincount(bins, weights=hits - values, minlength=N_BINS)
        return float(np.abs(gap).sum() / values.size)

    top = ece(p.max(1), (p.argmax(1) == y).astype(np.float64))
    cece = float(np.mean([ece(p[:, k], (y == k).astype(np.float64)) for k in range(NUM_CLASSES)]))
    return top, cece


def _scipy_hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float:
    """HD95 (max of the directed 95th percentiles) with full-volume scipy EDTs."""
    from scipy import ndimage

    def edges(m: np.ndarray) -> np.ndarray:
        return m & ~ndimage.binary_erosion(m)

    ep, eg = edges(pred), edges(gt)
    d_pg = ndimage.distance_transform_edt(~eg, sampling=spacing)[ep]
    d_gp = ndimage.distance_transform_edt(~ep, sampling=spacing)[eg]
    return float(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))


def _row(rows: list[dict], size: int, name: str, ours: float, ref_name: str, ref: float | None, agree: str) -> None:
    rows.append(
        {
            "size": size,
            "metric": name,
            "ours_ms": ours * 1e3,
            "reference": ref_name,
            "ref_ms": None if ref is None else ref * 1e3,
            "ratio": None if ref is None else ref / ours,
            "agreement": agree,
        }
    )


def bench_cpu(size: int, repeats: int, scipy_reference: bool) -> list[dict]:
    from monai.metrics import CalibrationErrorMetric, compute_hausdorff_distance
    from torchmetrics.classification import MulticlassCalibrationError

    rows: list[dict] = []
    probs, gt, pred = make_inputs(size)
    ece64, cece64 = _float64_ece(probs, gt)

    # top-label ECE vs torchmetrics
    tm = MulticlassCalibrationError(num_classes=NUM_CLASSES, n_bins=N_BINS, norm="l1")
    t_ours, ece, t_ref, ece_ref = timed_pair(
        lambda: expected_calibration_error(probs, gt, n_bins=N_BINS), lambda: float(tm(probs, gt)), repeats
    )
    _row(rows, size, "ece", t_ours, "torchmetrics", t_ref, f"ours {ece:.6f} (float64 ref {ece64:.6f}), tm {ece_ref:.6f}")

    # class-wise ECE vs MONAI
    onehot = _onehot(gt)

    def monai_cece() -> float:
        metric = CalibrationErrorMetric(num_bins=N_BINS, include_background=True)
        metric(probs, onehot)
        return float(metric.aggregate())

    t_ours, cece, t_ref, cece_ref = timed_pair(
        lambda: classwise_calibration_error(probs, gt, n_bins=N_BINS), monai_cece, repeats
    )
    _row(rows, size, "cece", t_ours, "MONAI", t_ref, f"ours {cece:.6f} (float64 ref {cece64:.6f}), MONAI {cece_ref:.6f}")

    # full metric update, three regions
    def full() -> dict:
        metric = CalibrationMetric(NUM_CLASSES, n_bins=N_BINS)
        metric.update(probs, gt, spacing=SPACING)
        return metric.compute()

    t_ours, report = timed(full, repeats)
    agree = "ece " + "/".join(f"{name} {region.ece:.4f}" for name, region in report.regions.items())
    _row(rows, size, "calibration_update", t_ours, "-", None, agree)

    # HD95 per foreground class vs MONAI (and scipy EDT)
    t_ours, ours = timed(
        lambda: surface_distances_per_class(pred[0], gt[0], NUM_CLASSES, spacing=SPACING, include_background=False), max(1, repeats - 1)
    )
    hd95 = [d["hd95"] for d in ours]
    p1, g1 = _onehot(pred), _onehot(gt)
    t_ref, ref = timed(
        lambda: compute_hausdorff_distance(p1, g1, include_background=False, percentile=95, spacing=list(SPACING)),
        1,
        warmup=False,
    )
    ref = ref[0].tolist()
    diff = max(abs(a - b) for a, b in zip(hd95, ref))
    _row(rows, size, "hd95 (3 classes)", t_ours, "MONAI", t_ref, f"max |diff| {diff:.1e} mm")
    if scipy_reference:
        p_np, g_np = pred[0].numpy(), gt[0].numpy()
        t_ref, ref = timed(
            lambda: [_scipy_hd95(p_np == k, g_np == k, SPACING) for k in range(1, NUM_CLASSES)], 1, warmup=False
        )
        diff = max(abs(a - b) for a, b in zip(hd95, ref))
        _row(rows, size, "hd95 (3 classes)", t_ours, "scipy EDT", t_ref, f"max |diff| {diff:.1e} mm")
    return rows


def bench_cuda(size: int, repeats: int, device: str = "cuda", regions: Sequence[str] | None = None) -> list[dict]:
    rows: list[dict] = []
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    probs, gt, pred = make_inputs(size, device=device)
    nbytes = probs.numel() * probs.element_size()
    scratch = torch.empty_like(probs)
    t_copy, _ = timed(lambda: scratch.copy_(probs), max(repeats, 10), sync)
    bandwidth = 2 * nbytes / t_copy  # read + write
    floor = nbytes / bandwidth
    _row(rows, size, "read probs once (floor)", floor, "-", None, f"{bandwidth / 1e9:.0f} GB/s d2d")
    metric = CalibrationMetric(NUM_CLASSES, n_bins=N_BINS, per_case=False, validate_args=False,
                               **({"regions": tuple(regions)} if regions else {}))

    def update() -> None:
        metric.reset()
        metric.update(probs, gt, spacing=SPACING)

    t_ours, _ = timed(update, repeats, sync)
    _row(rows, size, "calibration_update", t_ours, "-", None, f"3 regions, all statistics; {t_ours / floor:.0f}x the floor")
    from segcalib.metrics import binning

    fused = binning.default_backend(probs.device)
    binning.default_backend, default = (lambda device: "torch"), binning.default_backend
    try:
        t_torch, _ = timed(update, repeats, sync)
    finally:
        binning.default_backend = default
    _row(rows, size, "calibration_update, torch ops", t_torch, "-", None, f"default backend here: {fused}")
    t_ours, _ = timed(lambda: expected_calibration_error(probs, gt, validate_args=False), repeats, sync)
    _row(rows, size, "ece", t_ours, "-", None, f"{t_ours / floor:.0f}x the floor")
    t_ours, ours = timed(
        lambda: surface_distances_per_class(pred[0], gt[0], NUM_CLASSES, spacing=SPACING, include_background=False), repeats, sync
    )
    _row(rows, size, "hd95 per class", t_ours / 3, "-", None, "mean of classes 1..3")
    rows.extend(hd95_parts(pred[0], gt[0], size, repeats, sync))
    return rows


def hd95_parts(pred: torch.Tensor, gt: torch.Tensor, size: int, repeats: int, sync: Callable[[], None]) -> list[dict]:
    """Where the time of class 1's HD95 goes: the crop to both surfaces, the surface voxels, and the
    two EDTs over the crop (the rest is reading them at the surface voxels and the percentiles)."""
    from segcalib.metrics.surface import cropped_pair
    from segcalib.spatial import distance
    from segcalib.spatial.morphology import mask_edges

    rows: list[dict] = []
    a, b = pred == 1, gt == 1
    t_crop, (ca, cb, sp) = timed(lambda: cropped_pair(a, b, SPACING), repeats, sync)
    t_edges, (ea, eb) = timed(lambda: (mask_edges(ca), mask_edges(cb)), repeats, sync)
    t_edt, _ = timed(lambda: (distance.edt(~eb, sp), distance.edt(~ea, sp)), repeats, sync)
    crop = "x".join(map(str, ca.shape))
    n_surface = int(ea.sum()) + int(eb.sum())
    engine = "CuPy" if a.is_cuda and distance._cupy() is not None else ("torch" if a.is_cuda else "scipy")
    _row(rows, size, "hd95 class 1: crop", t_crop, "-", None, f"crop {crop} of {size}^3")
    _row(rows, size, "hd95 class 1: surface voxels", t_edges, "-", None, f"{n_surface} surface voxels")
    _row(rows, size, "hd95 class 1: two EDTs over the crop", t_edt, "-", None, f"{engine} EDT")
    return rows


def measure_update(
    size: int, repeats: int, device_path: bool = False, regions: Sequence[str] | None = None
) -> dict[str, float]:
    """One ``CalibrationMetric.update`` (every statistic, no per-case records, no value checks; every
    registered region unless ``regions``) on the segcalib that imports: best time (ms) and, from the torch profiler, the kernels
    it runs, its host syncs (``aten::_local_scalar_dense``: ``.item()``, ``.tolist()``...) and its
    ``bincount`` calls (each one is two more host syncs on CUDA).

    ``device_path``: run what CUDA runs (without Triton, with CUDA's chunk of voxels) on the CPU
    tensors instead of the tuned CPU kernel -- the torch backend here, the ``bincount`` reference
    kernel in the code before it.
    """
    from segcalib.metrics import binning, calibration_functional

    probs, gt, _ = make_inputs(size)
    metric = CalibrationMetric(NUM_CLASSES, n_bins=N_BINS, per_case=False, validate_args=False,
                               **({"regions": tuple(regions)} if regions else {}))

    def update() -> None:
        metric.reset()
        metric.update(probs, gt, spacing=SPACING)

    saved: dict[tuple[Any, str], Any] = {}

    def patch(module: Any, name: str, value: Any) -> None:
        saved[module, name] = getattr(module, name)
        setattr(module, name, value)

    if device_path:  # with CUDA's chunk of voxels
        patch(binning, "_CHUNK_ENTRIES", {**binning._CHUNK_ENTRIES, "cpu": binning._CHUNK_ENTRIES["cuda"]})
    if device_path and hasattr(binning, "default_backend"):
        patch(binning, "default_backend", lambda device: "torch")
    elif device_path:  # the code before the batched histograms: case_histograms(tuned=False)
        patch(calibration_functional, "case_histograms", functools.partial(binning.case_histograms, tuned=False))
    try:
        best, _ = timed(update, repeats)
        kernels = count_kernels(update)
        everything = count_kernels(update, leaves_only=False)
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)
    return {
        "ms": best * 1e3,
        "kernels": sum(kernels.values()),
        "syncs": everything["aten::_local_scalar_dense"],
        "bincounts": everything["aten::bincount"],
    }


_PATHS = ((False, None), (True, None), (True, ("all", "foreground")))  # (device path, regions)


def _measure_baseline(rev: str, size: int, repeats: int, threads: int) -> list[dict[str, float]]:
    """:func:`measure_update` (CPU path and device path) on segcalib as of git revision ``rev``, in
    a subprocess that imports that revision's package (this file's benchmark code)."""
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", rev, "segcalib"], cwd=root, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        code = (
            f"import sys, json; sys.path[:0] = [{tmp!r}, {str(root)!r}]; import torch; torch.set_num_threads({threads}); "
            "import segcalib; assert segcalib.__file__.startswith(sys.path[0]), segcalib.__file__; "
            "from benchmarks.bench_metrics import measure_update; "
            f"print(json.dumps([measure_update({size}, {repeats}, d, r) for d, r in {_PATHS!r}]))"
        )
        run = subprocess.run([sys.executable, "-c", code], cwd=tmp, check=True, capture_output=True, text=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def bench_update_paths(size: int, repeats: int, baseline: str | None, threads: int) -> str:
    """Markdown table: one ``update`` on the CPU path and on the device path, before (revision
    ``baseline``) and now, with kernel, host-sync and bincount counts."""
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    now = [measure_update(size, repeats, d, r) for d, r in _PATHS]
    rows = []
    if baseline:
        old = _measure_baseline(baseline, size, repeats, threads)
        names = ("CPU (tuned kernel)", "device path (bincount reference)", "device path, all + foreground")
        rows += [(f"before ({baseline})", name, value) for name, value in zip(names, old)]
    names = ("CPU (tuned kernel)", "device path (torch backend)", "device path, all + foreground")
    rows += [("now", name, value) for name, value in zip(names, now)]
    lines = [
        f"### One `CalibrationMetric.update`, {size}³×{NUM_CLASSES}, CPU {threads} threads",
        "",
        "3 regions (all, foreground, boundary) unless named; the device path is what CUDA runs without Triton.",
        "",
        f"load: `{load}`",
        "",
        "| code | path | time (ms) | kernels | host syncs | bincount calls |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {c} | {p} | {r['ms']:.1f} | {r['kernels']:.0f} | {r['syncs']:.0f} | {r['bincounts']:.0f} |" for c, p, r in rows]
    return "\n".join(lines)


def format_table(rows: list[dict], title: str) -> str:
    header = "| size | metric | ours (ms) | reference | ref (ms) | speed-up | values |\n|---|---|---:|---|---:|---:|---|"
    lines = [f"### {title}", "", header]
    for r in rows:
        ref_ms = "-" if r["ref_ms"] is None else f"{r['ref_ms']:.1f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.1f}x"
        lines.append(
            f"| {r['size']}³ | {r['metric']} | {r['ours_ms']:.1f} | {r['reference']} | {ref_ms} | {ratio} | {r['agreement']} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per call, best kept (default: 5 below 256³, else 3)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--no-scipy", action="store_true", help="skip the (slow) scipy EDT HD95 reference")
    parser.add_argument("--update-paths", type=int, default=None, metavar="SIZE",
                        help="only the update table (kernels, syncs, time of the CPU and device paths) at SIZE³")
    parser.add_argument("--baseline", default=None, metavar="REV",
                        help="with --update-paths: also measure segcalib as of git revision REV")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.update_paths:
        print(bench_update_paths(args.update_paths, args.repeats or 5, args.baseline, args.threads), flush=True)
        return []
    rows: list[dict] = []
    run_cpu = args.device in ("auto", "cpu")
    run_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if run_cpu:
        cpu_rows = []
        for size in args.sizes:
            repeats = args.repeats or (5 if size < 256 else 3)
            cpu_rows += bench_cpu(size, repeats, scipy_reference=not args.no_scipy)
        print(format_table(cpu_rows, f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"), flush=True)
        rows += cpu_rows
    if run_cuda:
        cuda_rows = []
        for size in args.sizes:
            cuda_rows += bench_cuda(size, args.repeats or 10)
        print(format_table(cuda_rows, f"CUDA, {torch.cuda.get_device_name()}"), flush=True)
        rows += cuda_rows
    return rows


if __name__ == "__main__":
    main()
