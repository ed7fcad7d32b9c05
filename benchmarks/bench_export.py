"""Host memory and time of exporting one large volume (issue: export <= 2x the size of its output).

A K-class "network" that echoes the image (so the cost is segcalib's, not a model's) is run by
sliding-window inference over an N^3 volume, then temperature, softmax, inversion to the file
geometry and the NIfTI writes (probs, seg, uncertainty) follow as in ``segcalib export``. Peak
resident memory (VmHWM) above the pre-export baseline is compared with the output's size
(N^3 x K float32). Each size runs in a fresh process so the peaks do not mix.

    python -m benchmarks.bench_export --sizes 256 512
    python -m benchmarks.bench_export --sizes 512 --device cuda   # inference and stitching on the GPU
    python -m benchmarks.bench_export --overlap 160 --cases 4     # seconds per case, writes overlapped or not

``--overlap N`` times instead the export of several N^3 cases (probs, seg, uncertainty) with the
writing of case i overlapped with the prediction of case i+1 and one after the other, and checks
that both give the same bytes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _status(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1]) / 1024  # MiB
    return float("nan")


def _reset_peak() -> None:
    try:  # Linux >= 4.0: writing 5 to clear_refs resets VmHWM
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def measure(size: int, classes: int, uncertainty: bool, device: str = "cpu") -> dict:
    """Peak host memory (MiB above the pre-export baseline) and seconds of exporting one N^3 case."""
    import nibabel as nib
    import torch
    from torch import nn

    from segcalib.config import load_config
    from segcalib.data.manifest import Case
    from segcalib.data.transforms import preprocessing
    from segcalib.export import output_paths
    from segcalib.export.exporter import export_case
    from segcalib.inference.sliding_window import SlidingWindow
    from segcalib.inference.trained_model import TrainedModel

    class Echo(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x * (k - classes / 2) for k in range(classes)], dim=1)

    if device == "cuda":  # the CUDA context's host memory belongs to the baseline, not to the export
        torch.zeros(1, device=device)
    folder = Path(tempfile.mkdtemp(prefix="segcalib-bench-export-"))
    image = folder / "case.nii.gz"
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.normal(size=(size, size, size)).astype(np.float32), np.diag([-1.0, -1.0, 1.0, 1.0])), image)
    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "configs" / "smoke.yaml", {"data.patch_size": [128, 128, 128], "model.strides": [2, 2, 2]})
    model = TrainedModel(cfg=cfg, net=Echo(), window=SlidingWindow(roi_size=[128, 128, 128], overlap=0.25, sw_batch_size=2),
                         checkpoint=folder, epoch=0, num_classes=classes, class_names=[str(k) for k in range(classes)],
                         config_hash="bench", device=torch.device(device))
    case = Case("case", (image,), None, "test")
    paths = output_paths(folder / "out", "case", ["uncertainty"] if uncertainty else ())
    chain = preprocessing(cfg.data, with_label=False)
    baseline = _status("VmRSS")
    _reset_peak()
    peak_reset = _status("VmHWM") - _status("VmRSS") < 64  # else VmHWM still holds an earlier peak
    started = time.perf_counter()
    export_case(model, case, chain, paths, temperature=1.5)
    seconds = time.perf_counter() - started
    peak = _status("VmHWM") - baseline
    output = size**3 * classes * 4 / 2**20
    return {"size": size, "classes": classes, "device": device, "output_mib": output,
            "peak_above_baseline_mib": peak, "ratio": peak / output, "seconds": seconds,
            "peak_reset": peak_reset}


def _echo_model(classes: int, device: str, folder: Path):
    """A TrainedModel whose K-class "network" echoes the image (the cost is segcalib's)."""
    import torch
    from torch import nn

    from segcalib.config import load_config
    from segcalib.inference.sliding_window import SlidingWindow
    from segcalib.inference.trained_model import TrainedModel

    class Echo(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x * (k - classes / 2) for k in range(classes)], dim=1)

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "configs" / "smoke.yaml", {"data.patch_size": [128, 128, 128], "model.strides": [2, 2, 2]})
    return cfg, TrainedModel(cfg=cfg, net=Echo(), window=SlidingWindow(roi_size=[128, 128, 128], overlap=0.25, sw_batch_size=2),
                             checkpoint=folder, epoch=0, num_classes=classes, class_names=[str(k) for k in range(classes)],
                             config_hash="bench", device=torch.device(device))


def measure_overlap(size: int, classes: int = 4, n_cases: int = 4, device: str = "cpu") -> dict:
    """Seconds per case of exporting ``n_cases`` N^3 cases (probs, seg, uncertainty) with writing
    overlapped with the next prediction and without, best of two rounds each; and whether both
    wrote the same bytes."""
    import nibabel as nib

    from segcalib.data.manifest import Case
    from segcalib.data.transforms import preprocessing
    from segcalib.export.exporter import ExportOptions, export_cases
    from segcalib.export.members import Member

    folder = Path(tempfile.mkdtemp(prefix="segcalib-bench-export-overlap-"))
    rng = np.random.default_rng(0)
    cases = []
    for i in range(n_cases):
        image = folder / f"case{i}.nii.gz"
        volume = rng.normal(size=(size, size, size)).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, np.diag([-1.0, -1.0, 1.0, 1.0])), image)
        cases.append(Case(f"case{i}", (image,), None, "test"))
    cfg, model = _echo_model(classes, device, folder)
    member = Member(model, temperature=1.5, chain=preprocessing(cfg.data, with_label=False))
    seconds: dict[str, list[float]] = {"overlapped": [], "sequential": []}
    for round_ in range(2):
        for mode in seconds:
            out = folder / f"{mode}{round_}"
            started = time.perf_counter()
            options = ExportOptions(uncertainty=True, overlap=mode == "overlapped", progress=False)
            export_cases([member], [None], 1, cases, out, ["uncertainty"], options)
            seconds[mode].append(time.perf_counter() - started)
    same = all((folder / "overlapped0" / p.name).read_bytes() == p.read_bytes() for p in (folder / "sequential0").iterdir())
    best = {mode: min(times) / n_cases for mode, times in seconds.items()}
    return {"size": size, "classes": classes, "cases": n_cases, "device": device,
            "s_per_case_overlapped": best["overlapped"], "s_per_case_sequential": best["sequential"],
            "speedup": best["sequential"] / best["overlapped"], "same_bytes": same}


def measure_in_child(size: int, classes: int = 4, device: str = "cpu", timeout: float | None = None) -> dict:
    """:func:`measure` in a fresh Python process, so that its peak is the export's alone."""
    cmd = [sys.executable, "-m", "benchmarks.bench_export", "--child", str(size), "--classes", str(classes), "--device", device]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"bench_export child ({size}^3, {device}) failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 512])
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--uncertainty", action="store_true", default=True)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the network and stitching run")
    parser.add_argument("--overlap", type=int, metavar="N", help="time several N^3 cases, overlapped and not")
    parser.add_argument("--cases", type=int, default=4, help="cases of --overlap (default 4)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.overlap:
        r = measure_overlap(args.overlap, args.classes, args.cases, args.device)
        print(f"{r['cases']} cases of {r['size']}³x{r['classes']} on {r['device']}: {r['s_per_case_sequential']:.2f} s/case "
              f"one after the other, {r['s_per_case_overlapped']:.2f} s/case overlapped ({r['speedup']:.2f}x); "
              f"same bytes: {r['same_bytes']}")
        return 0
    if args.child:
        print(json.dumps(measure(args.child, args.classes, args.uncertainty, args.device)))
        return 0
    print(f"{'size':>6} {'output MiB':>11} {'peak MiB':>9} {'peak/output':>12} {'seconds':>8}")
    for size in args.sizes:
        r = measure_in_child(size, args.classes, args.device)
        print(f"{r['size']:>5}³ {r['output_mib']:>11.0f} {r['peak_above_baseline_mib']:>9.0f} {r['ratio']:>11.2f}× {r['seconds']:>8.1f}")
    print("target: peak host memory <= 2x the output (probability map) size")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
