"""Host memory of exporting one case with an ensemble of M members vs one member (issue: <= 1.5x).

Each member is a cheap stand-in network -- a seeded 1x1x1 convolution from the image to K class
logits -- run by sliding-window inference over an N^3 volume, so that segcalib's own memory (the
member's probabilities, the running sums of :class:`~segcalib.inference.ensemble.ProbabilityEnsemble`,
the inversion to the file geometry, the writers) is what is measured, not a model's. The export is
``segcalib.export.exporter._export_case`` with :class:`~segcalib.export.members.Member` objects, as
``segcalib export --run A --run B ...`` calls it: one member writes probs, seg and the predictive
entropy (``--uncertainty``); an ensemble writes probs, seg, entropy, mutual information and expected
entropy. Peak resident memory (VmHWM) above the pre-export baseline; each export in a fresh process.

    python -m benchmarks.bench_ensemble_memory                     # 256^3 x 4 classes, 1 vs 5 members
    python -m benchmarks.bench_ensemble_memory --size 64 --members 1 3
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

TARGET = 1.5


def measure(size: int, classes: int, members: int) -> dict:
    """Peak host memory (MiB above the pre-export baseline) and seconds of one N^3 case's export."""
    folder = Path(tempfile.mkdtemp(prefix="segcalib-bench-ensemble-"))
    try:
        return _measure(folder, size, classes, members)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _measure(folder: Path, size: int, classes: int, members: int) -> dict:
    import nibabel as nib
    import torch
    from torch import nn

    from segcalib.config import load_config
    from segcalib.data.manifest import Case
    from segcalib.data.transforms import preprocessing
    from segcalib.export.exporter import ExportOptions, _export_case
    from segcalib.export.members import Member
    from segcalib.export.writers import ENSEMBLE_MAPS, output_paths
    from segcalib.inference.sliding_window import SlidingWindow
    from segcalib.inference.trained_model import TrainedModel

    image = folder / "case.nii.gz"
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(size, size, size)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.diag([-1.0, -1.0, 1.0, 1.0])), image)
    del volume
    repo = Path(__file__).resolve().parents[1]
    roi = min(size, 128)
    cfg = load_config(repo / "configs" / "smoke.yaml", {"data.patch_size": [roi] * 3, "model.strides": [2, 2, 2]})
    chain = preprocessing(cfg.data, with_label=False)
    window = SlidingWindow(roi_size=[roi] * 3, overlap=0.25, sw_batch_size=2)
    team = []
    for m in range(members):
        torch.manual_seed(m)
        net = nn.Conv3d(1, classes, kernel_size=1).eval()  # a different stand-in model per member
        model = TrainedModel(cfg=cfg, net=net, window=window, checkpoint=folder, epoch=0, num_classes=classes,
                             class_names=[str(k) for k in range(classes)], config_hash=f"bench{m}", device=torch.device("cpu"))
        team.append(Member(model, temperature=1.0 + 0.1 * m, chain=chain))
    extra = ["uncertainty"] if members == 1 else list(ENSEMBLE_MAPS)
    paths = output_paths(folder / "out", "case", extra)
    (folder / "out").mkdir()
    case = Case("case", (image,), None, "test")
    baseline = _status("VmRSS")
    _reset_peak()
    peak_reset = _status("VmHWM") - _status("VmRSS") < 64
    started = time.perf_counter()
    with torch.no_grad():
        _export_case(team, [None] * members, 1, case, paths, ExportOptions(uncertainty=members == 1, progress=False))
    seconds = time.perf_counter() - started
    output = size**3 * classes * 4 / 2**20
    written = sorted(p.name for p in (folder / "out").iterdir())
    return {"size": size, "classes": classes, "members": members, "output_mib": output,
            "peak_above_baseline_mib": _status("VmHWM") - baseline, "seconds": seconds, "peak_reset": peak_reset,
            "files": written}


def measure_in_child(size: int, classes: int, members: int, timeout: float | None = None) -> dict:
    """:func:`measure` in a fresh Python process, so that its peak is this export's alone."""
    cmd = [sys.executable, "-m", "benchmarks.bench_ensemble_memory", "--child", str(members),
           "--size", str(size), "--classes", str(classes)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"bench_ensemble_memory child ({members} members, {size}^3) failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--members", nargs="+", type=int, default=[1, 5], help="the first is the reference")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.size, args.classes, args.child)))
        return 0
    print(f"one case of {args.size}^3 x {args.classes} classes "
          f"({args.size**3 * args.classes * 4 / 2**20:.0f} MiB of float32 probabilities)")
    print(f"{'members':>8} {'peak MiB':>9} {'peak/output':>12} {'vs first':>9} {'seconds':>8}  files")
    rows = []
    for m in args.members:
        r = measure_in_child(args.size, args.classes, m)
        r["ratio_to_first"] = r["peak_above_baseline_mib"] / rows[0]["peak_above_baseline_mib"] if rows else 1.0
        rows.append(r)
        print(f"{m:>8} {r['peak_above_baseline_mib']:>9.0f} {r['peak_above_baseline_mib'] / r['output_mib']:>11.2f}x "
              f"{r['ratio_to_first']:>8.2f}x {r['seconds']:>8.1f}  {', '.join(r['files'])}", flush=True)
    worst = max(r["ratio_to_first"] for r in rows)
    print(f"target: an ensemble's peak <= {TARGET}x a single member's export: "
          f"{'met' if worst <= TARGET else 'MISSED'} (worst {worst:.2f}x)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
