"""evaluate --protocol and the uncertainty section against independent references (MONAI, medpy,
scikit-learn, float64 NumPy) on hand-made maps; the HTML names the protocol and shows the cases."""

from __future__ import annotations

import math
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import stats

from segcalib.cli import main
from segcalib.data import load_manifest
from segcalib.reports import evaluate, read_report
from tests.metrics._reference import ref_calibration
from tests.synthetic import make_dataset, write_nifti

C = 3


def _read(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """4 test cases with noisy probabilities; the export wrote ensemble maps (entropy halved, to
    tell the exported map from the computed one)."""
    root = tmp_path_factory.mktemp("protocols")
    manifest = make_dataset(root / "data", 5, (14, 12, 8), np.diag([1.0, 0.8, 2.0, 1.0]), {"training": 1, "test": 4})
    rng = np.random.default_rng(7)
    pred = root / "pred"
    data = {}
    for i, case in enumerate(load_manifest(manifest).cases("test")):
        label = _read(case.label).astype(np.int64)
        noisy = np.where(rng.random(label.shape) < 0.15 * (i + 1), rng.integers(0, C, label.shape), label)
        logits = (1.5 + i) * np.eye(C)[noisy] + rng.normal(0, 1.0, label.shape + (C,))
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        affine = nib.load(str(case.label)).affine
        write_nifti(pred / f"{case.case_id}_probs.nii.gz", probs.astype(np.float32), affine)
        probs = _read(pred / f"{case.case_id}_probs.nii.gz").astype(np.float64)  # as evaluate reads it
        entropy = -(probs * np.log(probs)).sum(-1)
        mutual = rng.uniform(0, 0.2, label.shape)
        for name, values in (("entropy", 0.5 * entropy), ("mutual_info", mutual), ("expected_entropy", 0.5 * entropy - mutual)):
            write_nifti(pred / f"{case.case_id}_{name}.nii.gz", np.clip(values, 0, None).astype(np.float32), affine)
        data[case.case_id] = (probs, label, np.abs(np.diag(affine))[:3])
    return manifest, pred, data


def test_monai_protocol_equals_monai(exported, tmp_path: Path) -> None:
    from monai.metrics import CalibrationErrorMetric

    manifest, pred, data = exported
    report = evaluate(pred, manifest, tmp_path / "monai", protocol="monai", write_html=False, uncertainty=False)
    metric = CalibrationErrorMetric(num_bins=20, include_background=False, metric_reduction="mean")
    for probs, label, _ in data.values():
        y = torch.nn.functional.one_hot(torch.from_numpy(label), C).movedim(-1, 0)[None].double()
        metric(y_pred=torch.from_numpy(probs).movedim(-1, 0)[None], y=y)
    assert report["protocol"]["name"] == "monai" and report["metadata"]["n_bins"] == 20
    assert report["protocol"]["values"]["monai_ece"] == pytest.approx(float(metric.aggregate()), abs=1e-6)
    assert report["metadata"]["include_background"] is False and "uncertainty" not in report
    probs = np.concatenate([np.moveaxis(p, -1, 0)[None] for p, _, _ in data.values()])
    labels = np.concatenate([y[None] for _, y, _ in data.values()])
    pooled_fg_cece = ref_calibration(probs, labels, 20, include_background=False)["cece"]
    assert report["calibration"]["all"]["cece"] == pytest.approx(pooled_fg_cece, abs=1e-6)  # 20 bins, no background
    assert read_report(tmp_path / "monai" / "report.json")["summary"]["protocol"] == "monai"


def test_media2023_protocol_equals_medpy_and_per_volume_foreground(exported, tmp_path: Path) -> None:
    from medpy.metric import binary

    manifest, pred, data = exported
    report = evaluate(pred, manifest, tmp_path / "media", protocol="media2023", write_html=False, uncertainty=False)
    values = report["protocol"]["values"]
    ece, cece, dices, hd95s = [], [], [], []
    for probs, label, _ in data.values():
        fg = label > 0
        ref = ref_calibration(np.moveaxis(probs, -1, 0)[None], label[None], 15, mask=fg[None])
        ece.append(ref["ece"])
        cece.append(ref["cece"])
        seg = probs.argmax(-1)
        d, h = [], []
        for k in range(1, C):
            p, g = seg == k, label == k
            if not g.any():
                d.append(1.0), h.append(0.0)
            elif not p.any():
                d.append(0.0), h.append(0.0)
            else:
                d.append(binary.dc(p, g)), h.append(binary.hd95(p, g))  # no spacing: voxels
        dices.append(np.mean(d)), hd95s.append(np.mean(h))
    assert values["ece_foreground_per_volume"] == pytest.approx(np.mean(ece), abs=1e-6)
    assert values["cece_foreground_per_volume"] == pytest.approx(np.mean(cece), abs=1e-6)
    assert values["medpy_dice"] == pytest.approx(np.mean(dices), rel=1e-12)
    assert values["medpy_hd95_voxels"] == pytest.approx(np.mean(hd95s), rel=1e-9)
    assert report["metadata"]["protocol"] == "media2023" and report["metadata"]["n_bins"] == 15


def _exact_aurc(u: np.ndarray, error: np.ndarray) -> float:
    order = np.argsort(u, kind="stable")
    e = error[order].astype(np.float64)
    return float(np.mean(np.cumsum(e) / np.arange(1, e.size + 1)))


def test_uncertainty_section_against_references(exported, tmp_path: Path) -> None:
    from sklearn.metrics import roc_auc_score

    manifest, pred, data = exported
    report = evaluate(pred, manifest, tmp_path / "default", write_html=True)
    section = report["uncertainty"]
    assert section["maps"] == ["entropy", "mutual_info", "expected_entropy", "one_minus_max"]
    u_all, err_all, means, dice = [], [], [], []
    for case, (probs, label, _) in data.items():
        u = _read(pred / f"{case}_entropy.nii.gz").astype(np.float64)
        seg = probs.argmax(-1)
        u_all.append(u.ravel()), err_all.append((seg != label).ravel())
        union = (seg > 0) | (label > 0)
        means.append(u[union].mean())
        d = [2 * ((seg == k) & (label == k)).sum() / ((seg == k).sum() + (label == k).sum()) for k in range(1, C)]
        dice.append(np.mean(d))
    u, err = np.concatenate(u_all), np.concatenate(err_all)
    got = section["metrics"]["entropy"]["all"]
    assert got["voxels"] == u.size and got["errors"] == int(err.sum())
    assert got["auroc"] == pytest.approx(roc_auc_score(err, u), abs=1e-3)
    assert abs(got["aurc"] - _exact_aurc(u, err)) <= got["aurc_bound"] + 1e-12
    rows = {r["case"]: r for r in report["cases"]}
    np.testing.assert_allclose([rows[c]["uncertainty"]["entropy"] for c in data], means, rtol=1e-6)
    corr = section["case_correlation"]["entropy"]
    assert corr["pearson"] == pytest.approx(stats.pearsonr(means, dice)[0], abs=1e-6)
    assert corr["spearman"] == pytest.approx(stats.spearmanr(means, dice)[0], abs=1e-9)
    fg = section["metrics"]["one_minus_max"]["foreground"]
    assert fg["voxels"] == sum(int((label > 0).sum()) for _, label, _ in data.values())
    assert 0.0 <= fg["qu_brats"]["score"] <= 1.0 and set(fg["qu_brats"]["classes"]) == {"0", "1", "2"}
    assert len(got["risk_coverage"]["coverage"]) <= 200 and got["risk_coverage"]["coverage"][-1] == pytest.approx(1.0)

    page = (tmp_path / "default" / "report.html").read_text()
    assert "Protocol: segcalib" in page and "mutual information (epistemic)" in page
    worst_first = sorted(data, key=lambda c: dice[list(data).index(c)])
    summaries = re.findall(r"<summary><b>([^<]+)</b>", page)
    assert summaries == worst_first
    assert page.count("<details open>") == min(5, len(data))
    assert not re.search(r"(src|href)=\"(http|//|file:)", page)
    assert page.count("data:image/png;base64,") >= len(data) + 2  # views, risk-coverage, scatter


def test_cli_protocol_and_binning_choices(exported, tmp_path: Path, capsys) -> None:
    manifest, pred, _ = exported
    out = tmp_path / "cli"
    code = main(["evaluate", "--predictions", str(pred), "--manifest", str(manifest), "--output", str(out),
                 "--protocol", "monai", "--binning", "equal-mass", "--no-uncertainty"])
    assert code == 0 and "protocol monai" in capsys.readouterr().out
    report = read_report(out / "report.json")
    assert report["metadata"]["binning"] == "equal-mass" and 0.0 <= report["calibration_equal_mass"]["all"]["ece"] <= 1.0
    bad = ["evaluate", "--predictions", str(pred), "--manifest", str(manifest), "--output", str(out), "--protocol", "nope"]
    try:
        code = main(bad)
    except SystemExit as exc:  # argparse's own exit for a bad choice
        code = exc.code
    assert code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
    assert math.isfinite(report["summary"]["monai_ece"])
