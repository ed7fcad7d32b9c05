"""Conformal control: memory flat in the number of cases, and validity over random splits.

1. Memory: ``fit_conformal`` (fnr with the inner fdr mask, and margin) on folders of N synthetic
   cases of S^3 x K float32 maps, each fit in a fresh process; peak resident memory (VmHWM) above
   the pre-fit baseline. The statistics are sums on fixed grids, so the peak is one case's
   working set whatever N is.
2. Validity: mean test risk over random calibration/test splits (CRC, fnr and margin) and
   Learn-then-Test's family-wise error, on synthetic cases of a known distribution and, with
   ``--study``, on a segcalib export's validation + test maps (the hippocampus table of
   docs/conformal.md).

    python -m benchmarks.bench_conformal                                  # 48^3 x 4, 2 / 8 cases
    python -m benchmarks.bench_conformal --size 128 --cases 4 16 64       # the issue's scale
    python -m benchmarks.bench_conformal --skip-memory --study runs/study/short/ce_dice/seed0/exports \\
        --manifest data_manifests/hippocampus_full.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_export import _reset_peak, _status

FLAT = 1.25  # peak(N_max) / peak(N_min) at most this: memory does not grow with the cases


def write_cases(root: Path, size: int, classes: int, n: int) -> Path:
    """``n`` cases of smooth random maps (``<case>_probs.nii``, uncompressed) and labels; the manifest."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, size, dtype=np.float32)] * 3, indexing="ij"))
    (root / "maps").mkdir(parents=True)
    (root / "labels").mkdir()
    entries = []
    for i in range(n):
        logits = np.zeros((size, size, size, classes), np.float32)
        label = np.zeros((size, size, size), np.uint8)
        for k in range(1, classes):
            centre = rng.uniform(-0.5, 0.5, (3, 1, 1, 1)).astype(np.float32)
            dist = np.sqrt(((grid - centre) ** 2).sum(0)) - np.float32(rng.uniform(0.15, 0.3))
            label[(dist < 0) & (label == 0)] = k
            logits[..., k] = -dist * 20 + rng.normal(0, 1, (size,) * 3).astype(np.float32)
        logits -= logits.max(-1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(-1, keepdims=True)
        nib.save(nib.Nifti1Image(probs, np.eye(4)), str(root / "maps" / f"case_{i:03d}_probs.nii"))
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(root / "labels" / f"case_{i:03d}.nii.gz"))
        entries.append({"image": f"labels/case_{i:03d}.nii.gz", "label": f"labels/case_{i:03d}.nii.gz"})
    labels = {str(k): ("background" if k == 0 else f"c{k}") for k in range(classes)}
    (root / "dataset.json").write_text(json.dumps({"name": "bench", "labels": labels, "modality": {"0": "MRI"},
                                                   "training": [], "validation": entries}))
    return root / "dataset.json"


def child(folder: str, risk: str) -> None:
    """Fit in this process; print the peak memory above the baseline (MiB) as JSON."""
    from segcalib.conformal import ConformalOptions, fit_conformal

    root = Path(folder)
    _reset_peak()
    base = _status("VmRSS")
    started = time.perf_counter()
    options = ConformalOptions(risk=risk, alpha=0.5, delta=0.5, inner_alpha=0.5 if risk == "fnr" else None)
    fit_conformal(root / "maps", root / "dataset.json", root / f"conf_{risk}", options)
    print(json.dumps({"peak_mib": _status("VmHWM") - base, "seconds": time.perf_counter() - started}))


def memory_rows(size: int, classes: int, cases: list[int], risks: list[str]) -> list[dict]:
    rows = []
    for n in cases:
        root = Path(tempfile.mkdtemp(prefix="segcalib-bench-conformal-"))
        try:
            write_cases(root, size, classes, n)
            for risk in risks:
                out = subprocess.run([sys.executable, "-m", "benchmarks.bench_conformal", "--child", str(root), "--risk", risk],
                                     check=True, capture_output=True, text=True).stdout
                rows.append({"cases": n, "risk": risk, **json.loads(out.strip().splitlines()[-1])})
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return rows


def validity_rows(losses: dict, sizes: dict, n_cal: int, alphas: list[float], splits: int, delta: float) -> list[dict]:
    """One row per (target, risk, alpha): mean test risk over splits, its bounds, mean size."""
    from segcalib.conformal.control import crc_min_cases, ltt_min_cases
    from segcalib.conformal.validity import crc_split_risk, ltt_split_error

    rows = []
    for name, by in losses.items():
        for risk, matrix in by.items():
            for alpha in alphas:
                if risk == "fdr":
                    if n_cal < ltt_min_cases(alpha, delta):
                        continue
                    result = ltt_split_error(matrix, n_cal, alpha, delta, splits, sizes=sizes[name][risk])
                    rows.append({"target": name, "risk": risk, "alpha": alpha, "n": n_cal, "fwer": result.mean,
                                 "delta": delta, "se": result.se, "size": result.mean_size,
                                 "test_risk": result.test_risk})
                elif n_cal >= crc_min_cases(alpha):
                    result = crc_split_risk(matrix, n_cal, alpha, splits, sizes=sizes[name][risk])
                    rows.append({"target": name, "risk": risk, "alpha": alpha, "n": n_cal, "risk_mean": result.mean,
                                 "low": alpha - 1 / (n_cal + 1), "se": result.se, "size": result.mean_size})
    return rows


def case_losses(cases) -> tuple[dict, dict]:
    """``({target: {risk: (N, L)}}, same for relative sizes)`` of ``(probs, label, spacing, names)`` cases."""
    from segcalib.conformal.grids import radius_grid, threshold_grid
    from segcalib.conformal.statistics import margin_counts, threshold_counts
    from segcalib.conformal.targets import targets, truth_of

    t, radii = threshold_grid(), radius_grid()
    losses: dict = {}
    sizes: dict = {}
    for probs, label, spacing, names in cases:
        for target in targets(probs, names):
            truth = truth_of(label, target.index)
            if not truth.any():
                continue
            counts = threshold_counts(target.prob, truth, t)
            margin = margin_counts(target.pred, truth, spacing, radii)
            for risk, c, loss in (("fnr", counts, counts.fnr()), ("fdr", counts, counts.fdr()), ("margin", margin, margin.fnr())):
                losses.setdefault(target.name, {}).setdefault(risk, []).append(loss)
                sizes.setdefault(target.name, {}).setdefault(risk, []).append(c.relative_size())
    as_arrays = lambda d: {k: {r: np.array(v) for r, v in by.items()} for k, by in d.items()}  # noqa: E731
    return as_arrays(losses), as_arrays(sizes)


def study_cases(study: Path, manifest_path: Path):
    from segcalib.conformal.targets import probabilities
    from segcalib.data import load_manifest, read_volume
    from segcalib.predictions import open_predictions

    for split in ("validation", "test"):
        folder = open_predictions(study / split)
        manifest = load_manifest(manifest_path, split_seed=int(folder.metadata.get("split_seed", 12345)))
        for case in manifest.labelled(split):
            pred = folder.read(case.case_id)
            label = read_volume(case.label, dtype=np.int64)[0].reshape(pred.spatial_shape)
            yield probabilities(pred), label, pred.spacing, manifest.class_names


def print_validity(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'target':<12}{'risk':<8}{'alpha':>6}{'n':>4}  {'mean test risk (or FWER)':<28}{'bounds':<22}{'size/truth':>10}")
    for r in rows:
        if r["risk"] == "fdr":
            ok = r["fwer"] <= r["delta"] + 3 * r["se"]
            print(f"{r['target']:<12}{'fdr':<8}{r['alpha']:>6g}{r['n']:>4}  FWER {r['fwer']:.4f} ± {r['se']:.4f}"
                  f"{'':<8}<= delta {r['delta']:g} {'ok' if ok else 'FAIL'}{r['size']:>10.3f}  (test fdr {r['test_risk']:.4f})")
        else:
            ok_hi = r["risk_mean"] <= r["alpha"] + 3 * r["se"]
            ok_lo = r["risk_mean"] >= r["low"] - 3 * r["se"]
            print(f"{r['target']:<12}{r['risk']:<8}{r['alpha']:>6g}{r['n']:>4}  {r['risk_mean']:.4f} ± {r['se']:.4f}"
                  f"{'':<12}[{r['low']:.4f}, {r['alpha']:g}] {'ok' if ok_hi else 'FAIL'}/{'tight' if ok_lo else 'conservative'}"
                  f"{r['size']:>10.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--cases", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--risks", nargs="+", default=["fnr", "margin"])
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--synthetic-cases", type=int, default=300)
    parser.add_argument("--splits", type=int, default=1000)
    parser.add_argument("--n-cal", type=int, default=40)
    parser.add_argument("--study", type=Path, default=None, help="a segcalib export root with validation/ and test/")
    parser.add_argument("--manifest", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--risk", default="fnr", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.risk)
        return 0
    if not args.skip_memory:
        rows = memory_rows(args.size, args.classes, args.cases, args.risks)
        print(f"conformal fit, {args.size}^3 x {args.classes} float32 maps: peak host memory above baseline")
        for r in rows:
            print(f"  {r['cases']:>4} cases  {r['risk']:<7} peak {r['peak_mib']:8.1f} MiB  {r['seconds']:7.2f} s")
        for risk in args.risks:
            peaks = [r["peak_mib"] for r in rows if r["risk"] == risk]
            ratio = max(peaks) / max(min(peaks), 1e-9)
            print(f"  {risk}: peak at {max(args.cases)} cases / at {min(args.cases)} = {ratio:.2f} "
                  f"({'flat' if ratio <= FLAT else 'GROWS'}, target <= {FLAT})")
    if args.synthetic_cases:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.conformal._synthetic import SPACING, synthetic_case

        names = ["background", "class1", "class2"]
        losses, sizes = case_losses((*synthetic_case(s), SPACING, names) for s in range(args.synthetic_cases))
        print_validity(f"synthetic cases ({args.synthetic_cases} in the pool), {args.splits} random splits",
                       validity_rows(losses, sizes, args.n_cal, [0.05, 0.1, 0.2], args.splits, 0.1))
    if args.study is not None:
        losses, sizes = case_losses(study_cases(args.study, args.manifest))
        n_pool = len(next(iter(losses.values()))["fnr"])
        n_cal = n_pool * 3 // 4
        print_validity(f"{args.study}: {n_pool} cases (validation + test), {args.splits} random splits",
                       validity_rows(losses, sizes, n_cal, [0.05, 0.1, 0.2], args.splits, 0.1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
