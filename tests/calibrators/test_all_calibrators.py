"""The same checks for every registered calibrator: streaming = one batch, merge, mask, dtypes, 2D/3D,
sums to 1, save/load round trip, argmax/order claims (hypothesis), bounded seeded sample, errors.

Hooks for a calibrator that needs them (keyed by registry name):
``PARAMS`` constructor parameters used by these tests, ``STREAM_ATOL`` tolerance of the
stream-vs-one-batch and merge checks (default 1e-6 on probabilities), ``MASK_PERTURB`` what the mask
check may change outside the fit region ("logits", "target"; default both: a method whose fit reads
the logits outside the region, through the predicted boundary or a convolution, perturbs only the target).
"""

from __future__ import annotations

import functools
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from segcalib.calibrators import (
    Calibrator,
    SampledCalibrator,
    build_calibrator,
    calibrator_class,
    list_calibrators,
    load_calibrator,
    save_calibrator,
)
from segcalib.errors import ConfigError, DataError
from tests.calibrators._helpers import NUM_CLASSES, SHAPES, miscalibrated, unit_spacing

ALL = list_calibrators()
OWN = {"temperature", "class_temperature", "vector", "matrix", "matrix_ti", "dirichlet"}
PARAMS: dict[str, dict] = {"isotonic": {"n_fine": 256}, "lts": {"steps": 40, "hidden": 8}}  # smaller, same code paths
STREAM_ATOL: dict[str, float] = {}
MASK_PERTURB: dict[str, tuple[str, ...]] = {"boundary_temperature": ("target",), "lts": ("target",)}


def make(name: str, **params) -> Calibrator:
    return build_calibrator(name, NUM_CLASSES, **{**PARAMS.get(name, {}), **params})


def offer(cal: Calibrator, logits, target, image, mask=None) -> None:
    cal.update(logits, target, mask, spacing=unit_spacing(logits.shape[0], logits.dim() - 2), image=image)


def apply(cal: Calibrator, logits, image) -> torch.Tensor:
    return cal.transform(logits, spacing=unit_spacing(logits.shape[0], logits.dim() - 2), image=image)


@functools.lru_cache(maxsize=None)
def fitted(name: str, dims: str = "3d") -> Calibrator:
    """``name`` fitted on ``dims`` data (a method may be specific to the dimension, e.g. a CNN's)."""
    cal = make(name)
    offer(cal, *miscalibrated(SHAPES[dims], seed=1))
    return cal.fit()


def test_own_calibrators_are_registered_with_consistent_claims() -> None:
    assert OWN <= set(ALL)
    for name in ALL:
        cls = calibrator_class(name)
        assert cls.name == name and issubclass(cls, Calibrator)
        assert isinstance(cls.preserves_argmax, bool) and isinstance(cls.preserves_order, bool)
        assert cls.preserves_argmax or not cls.preserves_order, f"{name}: order preserved implies argmax preserved"
        doc = (cls.__doc__ or "") + (sys.modules[cls.__module__].__doc__ or "")
        assert "preserv" in doc.lower(), f"{name}: the docstring must state what the map preserves"
    assert calibrator_class("temperature").preserves_order
    affine = ("class_temperature", "vector", "matrix", "matrix_ti", "dirichlet")
    assert not any(calibrator_class(n).preserves_argmax for n in affine)


def test_unknown_name_and_parameter_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown calibrator 'nope'.*temperature"):
        build_calibrator("nope", 3)
    with pytest.raises(ConfigError, match="calibrator 'temperature': unknown parameter 'bins'"):
        build_calibrator("temperature", 3, bins=4)
    with pytest.raises(ConfigError, match="num_classes"):
        build_calibrator("temperature", 1)
    for name in ("temperature", "class_temperature", "vector", "matrix", "dirichlet"):
        with pytest.raises(ConfigError, match=f"calibrator '{name}': max_iter must be an integer >= 1"):
            build_calibrator(name, 3, max_iter=0)
    with pytest.raises(ConfigError, match="calibrator 'matrix': lambda_reg must be a finite number >= 0"):
        build_calibrator("matrix", 3, lambda_reg=float("nan"))


@pytest.mark.parametrize("dims", sorted(SHAPES))
@pytest.mark.parametrize("name", ALL)
def test_stream_equals_one_batch_and_merge(name: str, dims: str) -> None:
    logits, target, image = miscalibrated(SHAPES[dims], seed=2)
    one = make(name)
    offer(one, logits, target, image)
    stream = make(name)
    parts = [make(name), make(name)]
    for b in range(logits.shape[0]):
        offer(stream, logits[b : b + 1], target[b : b + 1], image[b : b + 1])
        offer(parts[b], logits[b : b + 1], target[b : b + 1], image[b : b + 1])
    parts[0].merge(parts[1])
    test_logits, _, test_image = miscalibrated(SHAPES[dims], seed=3)
    expected = apply(one.fit(), test_logits, test_image)
    atol = STREAM_ATOL.get(name, 1e-6)
    torch.testing.assert_close(apply(stream.fit(), test_logits, test_image), expected, rtol=0, atol=atol)
    torch.testing.assert_close(apply(parts[0].fit(), test_logits, test_image), expected, rtol=0, atol=atol)


@pytest.mark.parametrize("dims", sorted(SHAPES))
@pytest.mark.parametrize("name", ALL)
def test_output_is_a_float32_distribution_for_float32_and_float64_input(name: str, dims: str) -> None:
    cal = fitted(name, dims)
    logits, _, image = miscalibrated(SHAPES[dims], seed=4, dtype=torch.float64)
    before = logits.clone()
    out64 = apply(cal, logits, image)
    out32 = apply(cal, logits.float(), image.float())
    assert torch.equal(logits, before), "transform modified its input"
    for out in (out32, out64):
        assert out.dtype == torch.float32 and out.shape == logits.shape
        assert (out >= 0).all() and torch.isfinite(out).all()
        torch.testing.assert_close(out.sum(dim=1), torch.ones_like(out[:, 0]), rtol=0, atol=1e-5)
    torch.testing.assert_close(out64, out32, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_save_load_round_trip_gives_identical_transform(name: str, tmp_path) -> None:
    cal = fitted(name)
    save_calibrator(cal, tmp_path, extra={"fit_region": "all"})
    loaded = load_calibrator(tmp_path)
    assert type(loaded) is type(cal) and loaded.num_classes == cal.num_classes
    assert loaded.get_params() == cal.get_params()
    logits, _, image = miscalibrated(SHAPES["3d"], seed=5)
    assert torch.equal(apply(loaded, logits, image), apply(cal, logits, image))


@pytest.mark.parametrize("name", ALL)
def test_mask_restricts_the_fit(name: str) -> None:
    logits, target, image = miscalibrated(SHAPES["3d"], seed=6)
    mask = torch.zeros_like(target, dtype=torch.bool)
    mask[:, 1:4] = True
    # Outside the region: confidently wrong logits and/or shuffled labels; the fit must not see them.
    changed_logits, changed_target = logits.clone(), target.clone()
    perturb = MASK_PERTURB.get(name, ("logits", "target"))
    if "logits" in perturb:
        changed_logits[:, 0][~mask] += 20.0
    if "target" in perturb:
        changed_target[~mask] = (target[~mask] + 1) % NUM_CLASSES
    a, b, unmasked = make(name), make(name), make(name)
    offer(a, logits, target, image, mask)
    offer(b, changed_logits, changed_target, image, mask)
    offer(unmasked, changed_logits, changed_target, image)
    test_logits, _, test_image = miscalibrated(SHAPES["3d"], seed=7)
    out_a = apply(a.fit(), test_logits, test_image)
    torch.testing.assert_close(apply(b.fit(), test_logits, test_image), out_a, rtol=0, atol=STREAM_ATOL.get(name, 1e-6))
    assert (apply(unmasked.fit(), test_logits, test_image) - out_a).abs().max() > 1e-3, "the mask made no difference"


def _logit_rows(rows: list[list[float]]) -> torch.Tensor:
    """``(1, C, n, 1)`` logits from ``n`` rows of C values."""
    return torch.tensor(rows, dtype=torch.float32).T.reshape(1, NUM_CLASSES, len(rows), 1)


_ROWS = st.lists(
    st.lists(st.floats(-30, 30, allow_nan=False, width=32), min_size=NUM_CLASSES, max_size=NUM_CLASSES),
    min_size=1,
    max_size=6,
)
_GAP = 1e-2  # classes closer than this in the input may legitimately tie after float32 rounding


def _well_separated(z: torch.Tensor) -> torch.Tensor:
    """Voxels ``(n,)`` whose sorted logits differ by more than ``_GAP`` at every step."""
    s = z[0, :, :, 0].sort(dim=0).values
    return (s.diff(dim=0) > _GAP).all(dim=0)


@pytest.mark.parametrize("name", [n for n in ALL if calibrator_class(n).preserves_argmax])
@settings(max_examples=40, deadline=None)
@given(rows=_ROWS)
def test_claimed_argmax_and_order_preservation_holds(name: str, rows) -> None:
    cal = fitted(name, "2d")
    z = _logit_rows(rows)
    keep = _well_separated(z)
    p = apply(cal, z, torch.zeros(1, 1, z.shape[2], 1))[0, :, :, 0]
    zz = z[0, :, :, 0]
    assert torch.equal(p.argmax(dim=0)[keep], zz.argmax(dim=0)[keep])
    if cal.preserves_order:
        # p may saturate to equal values (0 or 1 in float32); it must never reverse the order
        order = zz.argsort(dim=0)
        sorted_p = p.gather(0, order)
        assert (sorted_p.diff(dim=0)[:, keep] >= 0).all()


@pytest.mark.parametrize("name", [n for n in ALL if issubclass(calibrator_class(n), SampledCalibrator)])
def test_sample_stays_bounded_and_seeded_fit_is_reproducible(name: str) -> None:
    def run(seed: int) -> Calibrator:
        cal = make(name, max_voxels=90, seed=seed)
        for i in range(12):
            offer(cal, *miscalibrated(SHAPES["3d"], seed=100 + i))
            assert len(cal.sample) <= 90
        return cal

    first, again, other = run(0), run(0), run(1)
    assert first.sample.total_offered == 12 * 2 * 5 * 6 * 4
    assert len(first.sample) == 90  # every class offered far more than its 30 slots
    assert torch.equal(first.sample.data()[0], again.sample.data()[0])
    assert not torch.equal(first.sample.data()[0], other.sample.data()[0])
    assert first.fit().get_params() == again.fit().get_params()


@pytest.mark.parametrize("name", ALL)
def test_errors_before_fit_and_on_empty_region(name: str) -> None:
    cal = make(name)
    logits, target, image = miscalibrated(SHAPES["2d"], seed=8)
    with pytest.raises(RuntimeError, match="not fitted"):
        apply(cal, logits, image)
    offer(cal, logits, target, image, torch.zeros_like(target, dtype=torch.bool))
    with pytest.raises(DataError):
        cal.fit()
    with pytest.raises(DataError):
        offer(cal, logits[:, :2], target, image)


@pytest.mark.parametrize("name", ALL)
def test_reset_forgets_the_statistics(name: str) -> None:
    logits, target, image = miscalibrated(SHAPES["2d"], seed=9)
    fresh, reused = make(name), make(name)
    offer(fresh, logits, target, image)
    offer(reused, *miscalibrated(SHAPES["2d"], seed=10))
    reused.fit()
    reused.reset()
    with pytest.raises(RuntimeError, match="not fitted"):
        apply(reused, logits, image)
    offer(reused, logits, target, image)
    torch.testing.assert_close(apply(reused.fit(), logits, image), apply(fresh.fit(), logits, image), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ALL)
def test_cuda_update_and_transform_match_cpu(name: str) -> None:
    logits, target, image = miscalibrated(SHAPES["3d"], seed=11)
    cpu, gpu = make(name), make(name)
    offer(cpu, logits, target, image)
    offer(gpu, logits.cuda(), target.cuda(), image.cuda())
    expected = apply(cpu.fit(), logits, image)
    with torch.backends.cudnn.flags(allow_tf32=False):  # convolutional methods (LTS) in full float32
        out = apply(gpu.fit(), logits.cuda(), image.cuda())
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=1e-5)
