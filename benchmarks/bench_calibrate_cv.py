"""``segcalib calibrate fit`` on a real run's maps: ``auto`` and each method, side by side with Fiducio 0.2
(L-BFGS) on the same voxels, the scaling in the number of cases, and the same commands beside a CPU hog.

Inputs: a segcalib run folder whose validation, training and test splits are exported with logits
(``pipelines/calibration_study.py`` writes them; the default is its first unit,
``runs/study/short/ce_dice/seed0``, a CE+Dice hippocampus run; missing splits are exported here).

Rows, each a fresh ``segcalib calibrate fit`` process timed from the outside (wall, start-up
included) with the ``seconds`` it records (file reading and fitting):

- ``auto`` (every default candidate, 5 folds, default criterion) on the 16 validation maps, on an
  idle machine and while a CPU-bound process runs on every core;
- each single method on the same maps, and Fiducio 0.2's fit of that method (``optimizer="lbfgs"``)
  on the same voxels held in memory (its fit time only: reading excluded, to its advantage);
- held-out NLL on the 20 test maps of each fitted calibrator;
- ``auto`` on 8/16/32/64 labelled maps (validation, then training maps) for the scaling.

    python -m benchmarks.bench_calibrate_cv [--run RUN] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RUN = REPO / "runs" / "study" / "short" / "ce_dice" / "seed0"
FIDUCIO = {"temperature": "TemperatureScaling", "vector": "VectorScaling", "matrix": "MatrixScaling",
           "dirichlet": "DirichletCalibration"}
SINGLE = ("temperature", "vector", "matrix", "dirichlet", "boundary_temperature")


def _segcalib(*args: str) -> list[str]:
    return [sys.executable, "-m", "segcalib", *args]


def ensure_exports(run: Path, manifest: Path) -> None:
    for split in ("validation", "training", "test"):
        folder = run / "exports" / split
        if not (folder / "export.json").exists():
            subprocess.run(_segcalib("export", "--run", str(run), "--manifest", str(manifest), "--split", split,
                                     "--logits", "--output", str(folder)), check=True, capture_output=True)


def fit(folder: Path, manifest: Path, split: str, method: str, out: Path, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """One ``calibrate fit`` process: wall seconds and its record."""
    started = time.perf_counter()
    proc = subprocess.run(_segcalib("calibrate", "fit", "--predictions", str(folder), "--manifest", str(manifest),
                                    "--split", split, "--method", method, "--output", str(out), *extra),
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"calibrate fit {method} failed:\n{proc.stderr[-3000:]}")
    record = json.loads((out / "calibrator.json").read_text())
    return {"wall_s": wall, "fit_s": float(record["seconds"]), "method": record["method"], "record": record}


def _voxels(folder: Path, manifest: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every labelled voxel of the split as ``(1, C, N, 1, 1)`` logits and ``(1, N, 1, 1)`` labels."""
    from segcalib.data import load_manifest, read_volume
    from segcalib.predictions import match_cases, open_predictions

    m = load_manifest(manifest)
    maps = open_predictions(folder, format="segcalib", input="logits")
    zs, ys = [], []
    for case, _ in match_cases(maps, m.labelled(split)):
        zs.append(torch.from_numpy(maps.read(case.case_id).values).reshape(m.num_classes, -1))
        ys.append(torch.from_numpy(read_volume(case.label, dtype=np.int64)[0]).reshape(-1))
    return torch.cat(zs, 1)[None, :, :, None, None], torch.cat(ys)[None, :, None, None]


def fiducio_fit_seconds(method: str, logits: torch.Tensor, labels: torch.Tensor) -> float:
    import fiducio

    torch.set_num_threads(1)  # as segcalib's fits
    calibrator = getattr(fiducio, FIDUCIO[method])(optimizer="lbfgs", device="cpu")
    started = time.perf_counter()
    calibrator.fit(logits, labels)
    return time.perf_counter() - started


def test_nll(calibrator_dir: Path, test_folder: Path, manifest: Path) -> float:
    """Pooled NLL of the calibrated test maps (``-log max(p_y, 1e-12)`` over every voxel)."""
    from segcalib.calibrators import load_calibrator
    from segcalib.data import load_manifest, read_volume
    from segcalib.predictions import match_cases, open_predictions

    m = load_manifest(manifest)
    calibrator = load_calibrator(calibrator_dir)
    maps = open_predictions(test_folder, format="segcalib", input="logits")
    total, count = 0.0, 0
    for case, _ in match_cases(maps, m.labelled("test")):
        label, header = read_volume(case.label, dtype=np.int64)
        z = torch.from_numpy(maps.read(case.case_id).values)[None]
        p = calibrator.transform(z, spacing=[tuple(header.spacing)])
        y = torch.from_numpy(label)[None, None]
        total += float(-p.gather(1, y).clamp_min(1e-12).log().double().sum())
        count += y.numel()
    return total / count


def _hog(stop) -> None:
    x = 0
    while not stop.is_set():
        x = (x * 1103515245 + 12345) % 2**31


def with_hog(fn, *args):
    """``fn(*args)`` while one busy process per core runs."""
    stop = multiprocessing.Event()
    hogs = [multiprocessing.Process(target=_hog, args=(stop,)) for _ in range(os.cpu_count() or 1)]
    for h in hogs:
        h.start()
    try:
        return fn(*args)
    finally:
        stop.set()
        for h in hogs:
            h.join()


def subset_manifest(manifest: Path, n: int, out: Path) -> Path:
    """A manifest whose ``validation`` list holds the first ``n`` labelled validation then training cases."""
    from segcalib.data import load_manifest

    m = load_manifest(manifest)
    cases = [*m.labelled("validation"), *m.labelled("training")][:n]
    raw = json.loads(manifest.read_text())
    raw["validation"] = [{"image": str(c.images[0]), "label": str(c.label)} for c in cases]
    raw["training"] = [{"image": str(c.images[0]), "label": str(c.label)} for c in m.labelled("training")
                       if c not in cases]
    raw["test"] = [{"image": str(c.images[0]), "label": str(c.label)} for c in m.labelled("test")]
    out.write_text(json.dumps(raw))
    return out


def merged_folder(run: Path, out: Path) -> Path:
    """Validation and training maps in one folder (links), so that any subset can be fitted on."""
    out.mkdir(parents=True, exist_ok=True)
    for split in ("validation", "training"):
        for f in (run / "exports" / split).glob("*_logits.nii.gz"):
            target = out / f.name
            if not target.exists():
                target.symlink_to(f)
    record = json.loads((run / "exports" / "validation" / "export.json").read_text())
    (out / "export.json").write_text(json.dumps(record))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=DEFAULT_RUN)
    parser.add_argument("--scaling", nargs="*", type=int, default=[8, 16, 32, 64])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from segcalib.config import load_config

    manifest = Path(load_config(args.run / "config.yaml").data.manifest)
    ensure_exports(args.run, manifest)
    val, test = args.run / "exports" / "validation", args.run / "exports" / "test"
    load = os.getloadavg()[0]
    print(f"run {args.run}; {os.cpu_count()} cores, load average {load:.2f} at the start")
    out: dict[str, Any] = {"run": str(args.run), "cores": os.cpu_count(), "load_at_start": load, "rows": []}
    logits, labels = _voxels(val, manifest, "validation")
    print(f"validation: {labels.numel():,} voxels x {logits.shape[1]} classes")
    with tempfile.TemporaryDirectory(prefix="segcalib-bench-cv-") as tmp:
        tmp = Path(tmp)
        auto = fit(val, manifest, "validation", "auto", tmp / "auto", ("--quiet",))
        busy = with_hog(fit, val, manifest, "validation", "auto", tmp / "auto_busy", ("--quiet",))
        dirichlet_f = fiducio_fit_seconds("dirichlet", logits, labels)
        print(f"\nauto ({auto['method']}): {auto['wall_s']:.1f} s wall, {auto['fit_s']:.1f} s fitting "
              f"= {auto['fit_s'] / dirichlet_f:.1f}x one Fiducio L-BFGS Dirichlet fit ({dirichlet_f:.2f} s); "
              f"beside a CPU hog on every core: {busy['wall_s']:.1f} s wall ({busy['wall_s'] / auto['wall_s']:.2f}x)")
        out["auto"] = {k: auto[k] for k in ("wall_s", "fit_s", "method")} | {
            "busy_wall_s": busy["wall_s"], "fiducio_dirichlet_s": dirichlet_f,
            "cv_seconds": {n: r.get("seconds") for n, r in auto["record"]["selection"]["cv_table"].items()}}
        print(f"\n{'method':<22}{'wall s':>8}{'fit s':>8}{'Fiducio s':>10}{'ratio':>7}{'test NLL':>10}")
        for method in SINGLE:
            row = fit(val, manifest, "validation", method, tmp / method)
            f_s = fiducio_fit_seconds(method, logits, labels) if method in FIDUCIO else float("nan")
            nll = test_nll(tmp / method, test, manifest)
            out["rows"].append({"method": method, "wall_s": row["wall_s"], "fit_s": row["fit_s"], "fiducio_s": f_s,
                                "test_nll": nll})
            print(f"{method:<22}{row['wall_s']:>8.1f}{row['fit_s']:>8.2f}{f_s:>10.2f}{row['fit_s'] / f_s:>7.2f}{nll:>10.5f}",
                  flush=True)
        print(f"\nscaling of auto in the number of cases\n{'cases':>6}{'wall s':>8}{'fit s':>8}")
        both = merged_folder(args.run, tmp / "maps")
        out["scaling"] = []
        for n in args.scaling:
            sub = subset_manifest(manifest, n, tmp / f"manifest{n}.json")
            row = fit(both, sub, "validation", "auto", tmp / f"auto{n}", ("--quiet",))
            out["scaling"].append({"cases": n, "wall_s": row["wall_s"], "fit_s": row["fit_s"]})
            print(f"{n:>6}{row['wall_s']:>8.1f}{row['fit_s']:>8.1f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
