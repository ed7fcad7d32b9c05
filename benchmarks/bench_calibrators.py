"""Post-hoc calibrators, segcalib vs Fiducio 0.2, on the same synthetic calibration and test volumes.

Each case is a 3D label map of 4 classes (background, an irregular organ, a core inside it, a
separate small lesion) drawn voxel by voxel from smooth "true" probabilities, so labels are noisy
only near boundaries; the "model" logits are the true log-probabilities plus smooth errors, with
class biases, multiplied by an over-confidence factor that depends on the predicted class and grows
near the predicted boundary -- so a global temperature cannot fit every region at once.

The cases are generated once (seeded) into a temporary folder of ``.npy`` files. Every row
(library, method, fit region) runs in its own Python process: segcalib streams the calibration
cases from the folder one at a time through ``update()``, while Fiducio, an in-memory library,
needs them all in one tensor before ``fit()``. Host peak memory is VmHWM above the post-import
baseline (reset with /proc/self/clear_refs) over reading + fit, so it counts what each library
must hold; fit seconds leave the reading out. Test metrics (NLL, ECE of the all /
foreground / boundary ground-truth regions, segcalib.metrics.CalibrationMetric, 15 bins,
boundary 2 mm) are computed on held-out test cases after the peak is read.

    python -m benchmarks.bench_calibrators                       # default sizes (8 min on 2 loaded cores)
    python -m benchmarks.bench_calibrators --large               # 40 calibration volumes of 128^3 x 4
    python -m benchmarks.bench_calibrators --cases 4 --size 24 --test-cases 2 --sweep 2 4 --sweep-size 24
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.bench_export import _reset_peak, _status
from segcalib.spatial.regions import ALL, BOUNDARY, FOREGROUND

CLASSES = 4
TEST_OFFSET = 1_000_000  # case indices of the test set (never used for calibration)
SHARED = {  # segcalib name -> Fiducio class name
    "temperature": "TemperatureScaling",
    "vector": "VectorScaling",
    "matrix": "MatrixScaling",
    "matrix_ti": "TranslationInvariantMatrixScaling",
    "dirichlet": "DirichletCalibration",
    "ensemble_temperature": "EnsembleTemperatureScaling",
}
ONLY_SEGCALIB = [  # (method, fit region)
    ("temperature", FOREGROUND), ("temperature", BOUNDARY), ("dirichlet", FOREGROUND),
    ("class_temperature", ALL), ("boundary_temperature", ALL), ("histogram_binning", ALL),
    ("isotonic", ALL), ("auto", ALL),
]
OVERCONFIDENCE = (1.5, 2.5, 3.0, 2.0)  # per predicted class
BIAS = (0.4, -0.3, 0.0, -0.5)  # per class, added to the model's true log-probabilities


# ----- synthetic cases ------------------------------------------------------------------------------
def synthetic_case(index: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits (1, 4, S, S, S) float32, target (1, S, S, S) int64)`` of case ``index``, seeded."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    shape = (size,) * 3
    axis = torch.arange(size, dtype=torch.float32)
    grid = torch.meshgrid(axis, axis, axis, indexing="ij")

    def uniform(low: float, high: float, n: int = 3) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=g)

    def smooth_noise(amplitude: float, channels: int = 1) -> torch.Tensor:
        low = torch.randn(1, channels, *(max(2, size // 8),) * 3, generator=g)
        return F.interpolate(low, size=shape, mode="trilinear", align_corners=True)[0] * amplitude

    def ellipsoid(center: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
        """Approximate signed distance in voxels (negative inside), with a wobbly surface."""
        r = sum(((x - c) / rad) ** 2 for x, c, rad in zip(grid, center, radii)).sqrt()
        return (r - 1) * float(radii.min()) + smooth_noise(0.06 * size)[0]

    organ_c = size / 2 + uniform(-0.06, 0.06) * size
    organ_r = uniform(0.25, 0.35) * size
    f_organ = ellipsoid(organ_c, organ_r)
    f_core = ellipsoid(organ_c + uniform(-0.05, 0.05) * size, organ_r * uniform(0.45, 0.6))
    lesion_c = organ_c + torch.sign(torch.rand(3, generator=g) - 0.5) * (organ_r + 0.1 * size)
    f_lesion = ellipsoid(lesion_c.clamp(0.1 * size, 0.9 * size), uniform(0.08, 0.12) * size)
    m_organ, m_core, m_lesion = (torch.sigmoid(-f) for f in (f_organ, f_core, f_lesion))
    probs = torch.stack([(1 - m_organ) * (1 - m_lesion), m_organ * (1 - m_core), m_organ * m_core, (1 - m_organ) * m_lesion])
    log_p = torch.log(probs.clamp_min(1e-6))
    log_p -= torch.logsumexp(log_p, dim=0, keepdim=True)
    gumbel = -torch.log(-torch.log(torch.rand(log_p.shape, generator=g).clamp(1e-12, 1 - 1e-7)))
    target = (log_p + gumbel).argmax(0)
    scores = log_p + smooth_noise(1.0, CLASSES) + torch.tensor(BIAS).reshape(-1, 1, 1, 1)
    predicted = scores.argmax(0)
    boundary = torch.stack([f.abs() for f in (f_organ, f_core, f_lesion)]).amin(0)
    tau = torch.tensor(OVERCONFIDENCE)[predicted] * (1 + 1.5 * torch.exp(-boundary**2 / 8))
    return (scores * tau).unsqueeze(0).contiguous(), target.unsqueeze(0)


def write_cases(folder: Path, indices, size: int, seed: int) -> None:
    """Generate cases ``indices`` once into ``folder`` (``<i>_logits.npy`` float32, ``<i>_target.npy`` uint8)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in indices:
        if not (folder / f"{i}_target.npy").exists():
            logits, target = synthetic_case(i, size, seed)
            np.save(folder / f"{i}_logits.npy", logits.numpy())
            np.save(folder / f"{i}_target.npy", target.to(torch.uint8).numpy())


def _cases(indices, folder: Path, clock: list[float]):
    """Yield ``(index, logits (1, C, *S), target (1, *S) int64)`` read from ``folder``; the seconds
    spent reading go to ``clock[0]``."""
    for i in indices:
        started = time.perf_counter()
        logits = torch.from_numpy(np.load(folder / f"{i}_logits.npy"))
        target = torch.from_numpy(np.load(folder / f"{i}_target.npy")).long()
        clock[0] += time.perf_counter() - started
        yield i, logits, target


def _region(name: str, target: torch.Tensor) -> torch.Tensor | None:
    from segcalib.spatial import RegionContext, region_mask

    context = RegionContext(target=target, spacing=[(1.0, 1.0, 1.0)], num_classes=CLASSES)
    return region_mask(name, context)


# ----- one row, in a child process --------------------------------------------------------------------
def _fit_segcalib(method: str, region: str, n_cases: int, folder: Path, seed: int, clock: list[float], max_voxels: int):
    from segcalib.calibrators import build_calibrator
    from segcalib.calibrators.selection import select_calibrator

    ids = range(n_cases)
    if method == "auto":
        def source():
            for i, logits, target in _cases(ids, folder, clock):
                yield str(i), logits, target, (1.0, 1.0, 1.0), None

        selection = select_calibrator(source, [str(i) for i in ids], CLASSES, folds=5, seed=seed, fit_region=region,
                                     max_voxels=max_voxels)
        table = {n: r["nll"]["mean"] for n, r in selection.table.items() if "error" not in r}
        return selection.calibrator, {"selected": selection.method, "cv_nll": table}
    calibrator = build_calibrator(method, CLASSES, max_voxels=max_voxels)
    for _, logits, target in _cases(ids, folder, clock):
        calibrator.update(logits, target, _region(region, target), spacing=[(1.0, 1.0, 1.0)])
        del logits, target
    calibrator.fit()
    used = len(calibrator.sample) if hasattr(calibrator, "sample") else None
    return calibrator, {"voxels_used": used}


def _fit_fiducio(method: str, region: str, n_cases: int, folder: Path, clock: list[float], optimizer: str):
    import fiducio

    logits_all = target_all = mask_all = None  # every case in memory: what Fiducio's fit() takes
    for i, logits, target in _cases(range(n_cases), folder, clock):
        if logits_all is None:
            logits_all = logits.new_empty((n_cases, *logits.shape[1:]))
            target_all = target.new_empty((n_cases, *target.shape[1:]))
            mask_all = None if region == ALL else torch.empty(target_all.shape, dtype=torch.bool)
        logits_all[i], target_all[i] = logits[0], target[0]
        if mask_all is not None:
            mask_all[i] = _region(region, target)[0]
        del logits, target
    calibrator = getattr(fiducio, SHARED[method])(optimizer=optimizer, device="cpu")
    calibrator.fit(logits_all, target_all, mask_all)
    return calibrator, {"voxels_used": int(target_all.numel() if mask_all is None else mask_all.sum())}


def run_row(lib: str, method: str, region: str, n_cases: int, folder: str, n_test: int, seed: int,
            optimizer: str = "adam", evaluate: bool = True, max_voxels: int | None = None,
            threads: int = 1) -> dict[str, Any]:
    """Fit one calibrator on cases ``0..n_cases-1`` of ``folder``; peak host memory (MiB above the
    post-import baseline), fit seconds (reading the cases excluded) and test metrics."""
    folder = Path(folder)
    import segcalib.calibrators  # noqa: F401  (imports before the baseline)
    import fiducio  # noqa: F401
    from segcalib.metrics import CalibrationMetric

    torch.set_num_threads(threads)
    baseline = _status("VmRSS")
    _reset_peak()
    peak_reset = _status("VmHWM") - _status("VmRSS") < 64
    clock = [0.0]
    started = time.perf_counter()
    if lib == "segcalib":
        calibrator, info = _fit_segcalib(method, region, n_cases, folder, seed, clock, max_voxels or _max_voxels())
    elif lib == "fiducio":
        calibrator, info = _fit_fiducio(method, region, n_cases, folder, clock, optimizer)
    else:
        calibrator, info = None, {}
    total = time.perf_counter() - started
    row = {"lib": lib, "method": method, "region": region, "cases": n_cases,
           "peak_mib": _status("VmHWM") - baseline, "fit_s": total - clock[0], "peak_reset": peak_reset, **info}
    if evaluate:
        metric = CalibrationMetric(num_classes=CLASSES, per_case=False)
        for _, logits, target in _cases(range(TEST_OFFSET, TEST_OFFSET + n_test), folder, [0.0]):
            if lib == "none":
                probs = torch.softmax(logits, dim=1)
            elif lib == "fiducio":
                with torch.no_grad():
                    probs = calibrator.transform(logits)
            else:
                probs = calibrator.transform(logits, spacing=[(1.0, 1.0, 1.0)])
            metric.update(probs, target, spacing=[(1.0, 1.0, 1.0)])
        result = metric.compute()
        row.update(nll=result[ALL].nll, **{f"ece_{r}": result[r].ece for r in (ALL, FOREGROUND, BOUNDARY)})
    return row


def run_in_child(spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """:func:`run_row` in a fresh Python process, so that its peak memory is its own."""
    cmd = [sys.executable, "-m", "benchmarks.bench_calibrators", "--child", json.dumps(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"bench_calibrators child {spec} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----- the table ----------------------------------------------------------------------------------------
def _line(row: dict[str, Any]) -> str:
    name = row["method"] + (f" ({row['selected']})" if row.get("selected") else "")
    metrics = "".join(f"{row[k]:>9.4f}" for k in ("nll", *(f"ece_{r}" for r in (ALL, FOREGROUND, BOUNDARY))))
    return f"{name:<34} {row['region']:<10} {row['lib']:<9}{metrics} {row['fit_s']:>7.1f} {row['peak_mib']:>8.0f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b > 0 and math.isfinite(a / b) else "n/a"


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Every row of the comparison, printed as it completes; returns the rows and the goals."""
    folder = Path(args.workdir) / f"cases{args.size}"
    write_cases(folder, [*range(args.cases), *range(TEST_OFFSET, TEST_OFFSET + args.test_cases)], args.size, args.seed)
    common = {"n_cases": args.cases, "folder": str(folder), "n_test": args.test_cases, "seed": args.seed,
              "optimizer": args.fiducio_optimizer, "max_voxels": args.max_voxels, "threads": args.threads}
    print(f"{args.cases} calibration cases, {args.test_cases} test cases of {args.size}^3 x {CLASSES} classes; "
          f"Fiducio optimizer: {args.fiducio_optimizer}; segcalib max_voxels: {args.max_voxels:,}; "
          f"torch threads: {args.threads}")
    header = (f"{'method':<34} {'fit on':<10} {'library':<9}{'NLL':>9}{'ECE all':>9}{'ECE fg':>9}{'ECE bnd':>9}"
              f" {'fit s':>7} {'peak MiB':>8}")
    print(header)
    rows = [run_in_child({"lib": "none", "method": "uncalibrated", "region": "-", **common})]
    print(_line(rows[0]), flush=True)
    shared = [m for m in dict.fromkeys(args.methods) if m in SHARED]
    goals: dict[str, Any] = {"nll_ratio": {}}
    for method in shared:
        pair = [run_in_child({"lib": lib, "method": method, "region": ALL, **common}) for lib in ("segcalib", "fiducio")]
        rows += pair
        s, f = pair
        goals["nll_ratio"][method] = s["nll"] / f["nll"]
        print(_line(s), _line(f), sep="\n")
        print(f"{'  segcalib/Fiducio':<34} NLL {_ratio(s['nll'], f['nll'])}, ECE all {_ratio(s['ece_all'], f['ece_all'])}, "
              f"fg {_ratio(s['ece_foreground'], f['ece_foreground'])}, bnd {_ratio(s['ece_boundary'], f['ece_boundary'])}, "
              f"fit time {_ratio(s['fit_s'], f['fit_s'])}, peak memory {_ratio(s['peak_mib'], f['peak_mib'])}", flush=True)
    for method, region in ONLY_SEGCALIB:
        if method in args.methods:
            rows.append(run_in_child({"lib": "segcalib", "method": method, "region": region, **common}))
            print(_line(rows[-1]), flush=True)
    singles = [r for r in rows if r["lib"] != "none" and r["method"] != "auto"]
    auto = [r for r in rows if r["method"] == "auto"]
    if singles:
        best = min(singles, key=lambda r: r["nll"])
        goals["best_single"] = {k: best[k] for k in ("lib", "method", "region", "nll")}
        if auto:
            goals["auto_nll_over_best"] = auto[0]["nll"] / best["nll"]
    return {"rows": rows, "goals": goals}


def sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Peak host memory of a temperature fit on N cases, segcalib (streamed) vs Fiducio (in memory)."""
    size = args.sweep_size
    volume = CLASSES * size**3 * 4 / 2**20
    print(f"\nmemory in the number of calibration cases: temperature, {size}^3 x {CLASSES} classes "
          f"({volume:.1f} MiB of float32 logits per case)")
    print(f"{'cases':>6} {'segcalib MiB':>13} {'Fiducio MiB':>12} {'Fiducio/segcalib':>17} {'segcalib s':>11} {'Fiducio s':>10}")
    folder = Path(args.workdir) / f"cases{size}"
    write_cases(folder, range(max(args.sweep)), size, args.seed)
    out = []
    for n in args.sweep:
        spec = {"method": "temperature", "region": ALL, "n_cases": n, "folder": str(folder), "n_test": 0, "seed": args.seed,
                "optimizer": args.fiducio_optimizer, "evaluate": False, "max_voxels": args.sweep_max_voxels,
                "threads": args.threads}
        s = run_in_child({"lib": "segcalib", **spec})
        f = run_in_child({"lib": "fiducio", **spec})
        out.append({"cases": n, "segcalib_mib": s["peak_mib"], "fiducio_mib": f["peak_mib"],
                     "segcalib_s": s["fit_s"], "fiducio_s": f["fit_s"], "volume_mib": volume})
        print(f"{n:>6} {s['peak_mib']:>13.0f} {f['peak_mib']:>12.0f} {_ratio(f['peak_mib'], s['peak_mib']):>17} "
              f"{s['fit_s']:>11.1f} {f['fit_s']:>10.1f}", flush=True)
    bound = args.sweep_max_voxels * (CLASSES + 1) * 4 / 2**20
    print(f"segcalib's bound: a sample of max_voxels = {args.sweep_max_voxels:,} voxels ({bound:.0f} MiB of float32 logits + keys) "
          f"plus the case being read ({volume:.1f} MiB of logits); Fiducio holds every case")
    return out


def _max_voxels() -> int:
    from segcalib.inference.temperature import DEFAULT_MAX_VOXELS

    return DEFAULT_MAX_VOXELS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=6, help="calibration cases")
    parser.add_argument("--test-cases", type=int, default=4)
    parser.add_argument("--size", type=int, default=20, help="edge of each cubic volume (voxels)")
    parser.add_argument("--methods", nargs="+", default=[*SHARED, *dict.fromkeys(m for m, _ in ONLY_SEGCALIB)])
    parser.add_argument("--fiducio-optimizer", choices=("adam", "lbfgs"), default="adam", help="Fiducio's default: adam")
    parser.add_argument("--sweep", nargs="*", type=int, default=[5, 10, 20, 40], help="case counts of the memory sweep")
    parser.add_argument("--sweep-size", type=int, default=32)
    parser.add_argument("--max-voxels", type=int, default=_max_voxels(), help="segcalib's voxel sample (its default)")
    parser.add_argument("--sweep-max-voxels", type=int, default=1 << 18, help="segcalib's voxel sample in the sweep")
    parser.add_argument("--large", action="store_true", help="40 calibration volumes of 128^3, sweep at 128^3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per row (1: on a shared, loaded machine 2 threads ran 9x slower)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_row(**json.loads(args.child))))
        return 0
    if args.large:
        args.cases, args.size, args.sweep_size, args.sweep_max_voxels = 40, 128, 128, _max_voxels()
    with tempfile.TemporaryDirectory(prefix="segcalib-bench-cal-") as tmp:
        args.workdir = tmp
        figures = compare(args)
        figures["sweep"] = sweep(args) if args.sweep else []
    goals = figures["goals"]
    print("\ngoals: segcalib test NLL <= Fiducio's x 1.01 per shared method: "
          + ", ".join(f"{m} {r:.4f}{' ok' if r <= 1.01 else ' MISSED'}" for m, r in goals["nll_ratio"].items()))
    if "auto_nll_over_best" in goals:
        r, best = goals["auto_nll_over_best"], goals["best_single"]
        print(f"       auto NLL / best single method's ({best['lib']} {best['method']} on {best['region']}): "
              f"{r:.4f}{' ok' if r <= 1.0 + 1e-9 else ' MISSED'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
