"""Every metric of :mod:`segcalib.metrics` by name, with its functional twin and streaming class,
and the binning schemes of the calibration measures.

One contract for all of them (MONAI / torchmetrics style): ``(B, C, *spatial)`` probabilities (or
one-hot), ``(B, *spatial)`` or ``(B, 1, *spatial)`` integer labels, ``spacing`` in mm per case
(``None`` = 1 mm), ``include_background`` defaulting to :data:`INCLUDE_BACKGROUND` everywhere.
:func:`metric_value` computes a registered metric of one batch as a float64 tensor;
:func:`streaming_metric` gives an object with ``update(probs, target, spacing=None)``,
``merge(other)`` and ``compute() -> Tensor`` that syncs under ``torch.distributed`` inside
``compute()``, so that any split of the cases over batches and processes gives the same value.

Values: calibration measures are 0-dim; segmentation measures are ``(C',)`` means over cases (NaN
cases left out, an inf kept); uncertainty measures score the predictive entropy of ``probs``
against the errors of its argmax (:class:`~segcalib.metrics.uncertainty.UncertaintyMetric`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from segcalib.errors import ConfigError
from segcalib.metrics.adaptive import AdaptiveCalibrationError, adaptive_calibration_error
from segcalib.metrics.calibration import CalibrationMetric
from segcalib.metrics.calibration_functional import (
    calibration_tensor_validation,
    calibration_update,
    classwise_calibration_error,
    expected_calibration_error,
    mce_from_bins,
)
from segcalib.metrics.inputs import INCLUDE_BACKGROUND, check_probs_target
from segcalib.metrics.kernel_calibration import kernel_calibration_error
from segcalib.metrics.monai_calibration import MonaiCalibrationError, monai_calibration_error, monai_reduction
from segcalib.metrics.nsd import compute_surface_dice
from segcalib.metrics.overlap import dice
from segcalib.metrics.scores import ScoreMetric, brier_score, log_score, root_brier_score
from segcalib.metrics.segmentation_metric import SegmentationMetric
from segcalib.metrics.smooth_ece import SmoothECE, smooth_ece
from segcalib.metrics.surface import compute_surface_distances
from segcalib.metrics.uncertainty import UncertaintyMetric, max_uncertainty
from segcalib.spatial.regions import ALL
from segcalib.utils.names import Registry

CALIBRATION, SEGMENTATION, UNCERTAINTY = "calibration", "segmentation", "uncertainty"
N_BINS = 15  # SPEC §3
MONAI_BINS = 20  # MONAI's CalibrationErrorMetric default
NSD_TOLERANCE_MM = 1.0


@dataclass(frozen=True)
class BinningScheme:
    """How confidences are grouped into bins for an ECE."""

    name: str
    description: str
    ece: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # (probs, target, n_bins) -> 0-dim


BINNINGS: dict[str, BinningScheme] = {
    scheme.name: scheme
    for scheme in (
        BinningScheme(
            "equal-width",
            "M equal-width bins (b/M, (b+1)/M], p = 0 in the first (SPEC §3; Guo et al. 2017)",
            lambda p, y, m: torch.tensor(expected_calibration_error(p, y, m), dtype=torch.float64),
        ),
        BinningScheme(
            "equal-mass",
            "M bins holding equal numbers of voxels (adaptive ECE, Nixon et al. 2019), from a bounded histogram",
            lambda p, y, m: adaptive_calibration_error(p, y, m, mode="top", exact=False)["ace"],
        ),
    )
}


def list_binnings() -> list[str]:
    """Names of the binning schemes (the CLI's ``--binning`` choices)."""
    return list(BINNINGS)


class Streamed:
    """A library metric behind the registry's one streaming interface.

    ``update(probs, target, spacing=None)`` feeds the wrapped metric, ``compute()`` returns the
    registered value (float64 tensor), ``merge(other)`` merges the wrapped states.
    """

    def __init__(self, metric: Any, feed: Callable[..., None], value: Callable[[Any], torch.Tensor]) -> None:
        self.metric, self._feed, self._value = metric, feed, value

    def update(self, probs: torch.Tensor, target: torch.Tensor, spacing: Any = None) -> None:
        self._feed(self.metric, probs, target, spacing)

    def merge(self, other: Streamed) -> Streamed:
        self.metric.merge(other.metric)
        return self

    def compute(self) -> torch.Tensor:
        return torch.as_tensor(self._value(self.metric), dtype=torch.float64)


@dataclass(frozen=True)
class MetricSpec:
    """One registered metric: what it measures, its convention for empty classes and masks, the
    library's functional twin and streaming class, and the registry's uniform adapters."""

    name: str
    kind: str
    description: str
    empty: str
    function: Callable[..., Any]
    metric_class: type | None
    value: Callable[[torch.Tensor, torch.Tensor, Any, bool], torch.Tensor]
    stream: Callable[[int, bool], Streamed] | None


_REGISTRY: Registry[MetricSpec] = Registry("metric")


def register_metric(spec: MetricSpec) -> MetricSpec:
    """Add a metric to the registry (its name must be new)."""
    return _REGISTRY.register(spec.name, spec)


def list_metrics(kind: str | None = None) -> list[str]:
    """Registered metric names (of one ``kind``: calibration, segmentation, uncertainty), in order."""
    return [n for n, s in _REGISTRY.items() if kind is None or s.kind == kind]


def metric_spec(name: str) -> MetricSpec:
    return _REGISTRY.lookup(name)


def metric_value(
    name: str, probs: torch.Tensor, target: torch.Tensor, spacing: Any = None, include_background: bool = INCLUDE_BACKGROUND
) -> torch.Tensor:
    """Metric ``name`` of one batch (its functional twin), float64."""
    value = metric_spec(name).value(probs, target, spacing, include_background)
    return torch.as_tensor(value, dtype=torch.float64).cpu()


def streaming_metric(name: str, num_classes: int, include_background: bool = INCLUDE_BACKGROUND) -> Streamed:
    """A fresh streaming form of metric ``name`` (ConfigError when it has none, e.g. ``kce``)."""
    spec = metric_spec(name)
    if spec.stream is None:
        raise ConfigError(f"metric {name!r} has no streaming form (it is computed on one batch)")
    return spec.stream(num_classes, include_background)


# -- calibration ----------------------------------------------------------------------------------


def _calibration_stream(attribute: str) -> Callable[[int, bool], Streamed]:
    def make(c: int, ib: bool) -> Streamed:
        metric = CalibrationMetric(c, n_bins=N_BINS, regions=(ALL,), include_background=ib, per_case=False)
        return Streamed(metric, lambda m, p, y, s: m.update(p, y, spacing=s), lambda m: getattr(m.compute()[ALL], attribute))

    return make


def _plain_stream(factory: Callable[[int, bool], Any], value: Callable[[Any], torch.Tensor]) -> Callable[[int, bool], Streamed]:
    return lambda c, ib: Streamed(factory(c, ib), lambda m, p, y, s: m.update(p, y), value)


def _mce(probs: torch.Tensor, target: torch.Tensor, spacing: Any, ib: bool) -> torch.Tensor:
    labels = calibration_tensor_validation(probs, target, None)
    stats = calibration_update(probs, labels, top=True, classwise=False, scores=False, n_bins=N_BINS)
    return mce_from_bins(stats["top"].sum(0)[0])


def _monai_value(probs: torch.Tensor, target: torch.Tensor, spacing: Any, ib: bool) -> torch.Tensor:
    return monai_reduction(monai_calibration_error(probs, target, MONAI_BINS, ib), "mean")[0]


_EMPTY_CAL = "voxels of every class are samples; a batch without voxels gives NaN"
for _spec in (
    MetricSpec("ece", CALIBRATION, "top-label ECE, 15 equal-width bins, pooled over voxels (SPEC §3)", _EMPTY_CAL,
               expected_calibration_error, CalibrationMetric,
               lambda p, y, s, ib: torch.tensor(expected_calibration_error(p, y, N_BINS)), _calibration_stream("ece")),
    MetricSpec("mce", CALIBRATION, "top-label MCE: largest bin gap over non-empty bins", _EMPTY_CAL,
               mce_from_bins, CalibrationMetric, _mce, _calibration_stream("mce")),
    MetricSpec("cece", CALIBRATION, "class-wise ECE: mean over classes of the ECE of p_k vs [y = k]",
               "a class never predicted nor present still has its p_k samples", classwise_calibration_error,
               CalibrationMetric, lambda p, y, s, ib: torch.tensor(classwise_calibration_error(p, y, N_BINS, ib)),
               _calibration_stream("cece")),
    MetricSpec("ace", CALIBRATION, "adaptive (equal-mass) class-wise ECE, Nixon et al. 2019", _EMPTY_CAL,
               adaptive_calibration_error, AdaptiveCalibrationError,
               lambda p, y, s, ib: adaptive_calibration_error(p, y, N_BINS, include_background=ib, exact=False)["ace"],
               _plain_stream(lambda c, ib: AdaptiveCalibrationError(c, N_BINS, include_background=ib), lambda m: m.compute()["ace"])),
    MetricSpec("monai_ece", CALIBRATION, "MONAI CalibrationErrorMetric: per image and class, 20 bins, mean",
               "an image/class without voxels is NaN and left out of the mean", monai_calibration_error,
               MonaiCalibrationError, _monai_value,
               _plain_stream(lambda c, ib: MonaiCalibrationError(MONAI_BINS, ib), lambda m: m.compute())),
    MetricSpec("smooth_ece", CALIBRATION, "smooth ECE (Błasiok & Nakkiran 2023), top label", _EMPTY_CAL,
               smooth_ece, SmoothECE, lambda p, y, s, ib: smooth_ece(p, y, include_background=ib, exact=False)["smece"],
               _plain_stream(lambda c, ib: SmoothECE(c, include_background=ib), lambda m: m.compute()["smece"])),
    MetricSpec("kce", CALIBRATION, "kernel calibration error (Widmann et al. 2019), O(n^2): one batch only",
               "fewer than 2 voxels gives NaN for the unbiased SKCE", kernel_calibration_error, None,
               lambda p, y, s, ib: kernel_calibration_error(p, y, include_background=ib)["kce"], None),
    MetricSpec("nll", CALIBRATION, "negative log-likelihood -log max(p_y, 1e-12)", _EMPTY_CAL,
               log_score, CalibrationMetric, lambda p, y, s, ib: log_score(p, y), _calibration_stream("nll")),
    MetricSpec("brier", CALIBRATION, "Brier score: mean over voxels of sum_k (p_k - [y = k])^2", _EMPTY_CAL,
               brier_score, ScoreMetric, lambda p, y, s, ib: brier_score(p, y, ib),
               _plain_stream(lambda c, ib: ScoreMetric(c, ib), lambda m: m.compute()["brier"])),
    MetricSpec("root_brier", CALIBRATION, "root Brier score (Metrics Reloaded)", _EMPTY_CAL,
               root_brier_score, ScoreMetric, lambda p, y, s, ib: root_brier_score(p, y, ib),
               _plain_stream(lambda c, ib: ScoreMetric(c, ib), lambda m: m.compute()["root_brier"])),
    MetricSpec("log_score", CALIBRATION, "logarithmic score (= NLL, Metrics Reloaded's name)", _EMPTY_CAL,
               log_score, ScoreMetric, lambda p, y, s, ib: log_score(p, y),
               _plain_stream(lambda c, ib: ScoreMetric(c, ib), lambda m: m.compute()["log_score"])),
):
    register_metric(_spec)


# -- segmentation -----------------------------------------------------------------------------------


def _case_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over cases (dim 0) without NaN; an inf stays inf (SPEC §4)."""
    return torch.nanmean(values, 0)


def _segmentation_stream(key: str) -> Callable[[int, bool], Streamed]:
    def make(c: int, ib: bool) -> Streamed:
        metric = SegmentationMetric(c, include_background=ib, nsd_tolerance_mm=NSD_TOLERANCE_MM)
        return Streamed(metric, lambda m, p, y, s: m.update(p, y, spacing=s), lambda m: m.compute()["mean"][key])

    return make


def _surface(key: str, voxels: bool = False) -> Callable[..., torch.Tensor]:
    def value(p: torch.Tensor, y: torch.Tensor, s: Any, ib: bool) -> torch.Tensor:
        return _case_mean(compute_surface_distances(p, y, p.shape[1], None if voxels else s, ib)[key])

    return value


_EMPTY_SEG = "class absent from both: NaN (left out of the mean, counted); from one: Dice/NSD 0, distances inf"
for _name, _text, _fn, _value in (
    ("dice", "Dice 2|P∩G|/(|P|+|G|) per class", dice, lambda p, y, s, ib: _case_mean(dice(p, y, p.shape[1], ib))),
    ("hd", "Hausdorff distance (mm)", compute_surface_distances, _surface("hd")),
    ("hd95", "95th percentile Hausdorff distance, max of the directed ones (mm, MONAI)", compute_surface_distances, _surface("hd95")),
    ("hd95_voxels", "HD95 with unit spacing (voxels)", compute_surface_distances, _surface("hd95", voxels=True)),
    ("assd", "average symmetric surface distance (mm)", compute_surface_distances, _surface("assd")),
    ("nsd", f"normalised surface Dice at {NSD_TOLERANCE_MM:g} mm (Nikolov et al. 2021)", compute_surface_dice,
     lambda p, y, s, ib: _case_mean(compute_surface_dice(p, y, p.shape[1], NSD_TOLERANCE_MM, s, ib))),
):
    register_metric(MetricSpec(_name, SEGMENTATION, _text, _EMPTY_SEG, _fn, SegmentationMetric, _value, _segmentation_stream(_name)))


# -- uncertainty ------------------------------------------------------------------------------------


def _uncertainty_metric(c: int, ib: bool) -> UncertaintyMetric:
    return UncertaintyMetric(c, (0.0, max_uncertainty("entropy", c)), include_background=ib)


def _feed_entropy(metric: UncertaintyMetric, probs: torch.Tensor, target: torch.Tensor, spacing: Any) -> None:
    probs, labels = check_probs_target(probs, target, metric.num_classes)
    metric.update(torch.special.entr(probs).sum(1), probs.argmax(1), labels)  # entropy in nats


_UNCERTAINTY_VALUES: dict[str, tuple[str, Callable[[dict], Any]]] = {
    "aurc": ("area under the risk-coverage curve of the entropy (error = argmax != label)", lambda r: r["aurc"]),
    "auroc": ("AUROC of the entropy as a detector of errors", lambda r: r["auroc"]),
    "ueo": ("uncertainty-error overlap at the best threshold (Jungo & Reyes 2019)", lambda r: r["ueo_best"]),
    "qu_brats": ("QU-BraTS score, mean over the evaluated classes (Mehta et al. 2022)", lambda r: r["qu_brats"]["score"]),
}


def _uncertainty_value(pick: Callable[[dict], Any]) -> Callable[..., torch.Tensor]:
    def value(p: torch.Tensor, y: torch.Tensor, s: Any, ib: bool) -> torch.Tensor:
        metric = _uncertainty_metric(p.shape[1], ib).to(p.device)
        _feed_entropy(metric, p, y, s)
        return torch.tensor(pick(metric.compute()), dtype=torch.float64)

    return value


for _name, (_text, _pick) in _UNCERTAINTY_VALUES.items():
    register_metric(
        MetricSpec(
            _name, UNCERTAINTY, _text, "no errors: AUROC NaN, AURC 0; no voxels: NaN", UncertaintyMetric,
            UncertaintyMetric, _uncertainty_value(_pick),
            (lambda pick: lambda c, ib: Streamed(_uncertainty_metric(c, ib), _feed_entropy, lambda m: pick(m.compute())))(_pick),
        )
    )
