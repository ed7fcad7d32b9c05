"""Issue 21, item 1: a calibrator records the input space it was fitted in, and every path that feeds
it (``calibrate apply`` on logits or probability maps, ``export --calibrator`` on a model's logits)
converts exactly into that space, or refuses. Checked for every registered calibrator."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from segcalib.calibrators import list_calibrators, load_calibrator, save_calibrator
from segcalib.calibrators.input_space import PROB_FLOOR, recorded_space, to_space
from segcalib.errors import DataError
from segcalib.export.members import Member
from segcalib.export.posthoc import as_logits
from segcalib.predictions import PredictionMap
from tests.calibrators._helpers import NUM_CLASSES, SHAPES, miscalibrated
from tests.calibrators.test_all_calibrators import fitted

SPACING = (1.0, 1.0, 1.0)


def _pred(values: np.ndarray, kind: str) -> PredictionMap:
    return PredictionMap(values=np.ascontiguousarray(values, dtype=np.float32), kind=kind, affine=np.eye(4),
                         source=None, geometry_file=None)  # type: ignore[arg-type]


def _apply(cal, pred: PredictionMap) -> np.ndarray:
    """What ``calibrate apply`` computes for one map (posthoc: convert, then transform)."""
    inputs = as_logits(pred, torch.device("cpu"), cal.input_space)
    return cal.transform(inputs, spacing=[SPACING]).numpy()[0]


def _export(cal, logits: torch.Tensor) -> np.ndarray:
    """What ``export --calibrator`` computes for one member's logits."""
    member = Member(model=None, calibrator=cal, chain=lambda item: item)  # type: ignore[arg-type]
    return member.to_probs(logits.clone().unsqueeze(0), SPACING).numpy()[0]


@pytest.mark.parametrize("fitted_on", ["logits", "probs"])
@pytest.mark.parametrize("name", list_calibrators())
def test_apply_and_export_give_the_same_maps_in_every_input_space(name: str, fitted_on: str, tmp_path) -> None:
    save_calibrator(fitted(name), tmp_path, fitted_on=fitted_on, source_format="nifti")
    cal = load_calibrator(tmp_path)
    assert cal.input_space == {"logits": "logits", "probs": "log_probs"}[fitted_on]
    record = json.loads((tmp_path / "calibrator.json").read_text())["input_space"]
    assert record == {"space": cal.input_space, "fitted_on": fitted_on, "source_format": "nifti", "prob_floor": 1e-12}

    logits = miscalibrated(SHAPES["3d"], seed=7)[0][0]  # (C, *S), another draw than the fit's
    logits[:, 0, 0, 0] = torch.tensor([60.0, -40.0, 0.0])  # probabilities below the floor
    exported = _export(cal, logits)
    from_logits = _apply(cal, _pred(logits.numpy(), "logits"))
    np.testing.assert_allclose(from_logits, exported, atol=1e-5)
    probs = torch.softmax(logits.double(), dim=0).float().numpy()  # a probability map as a file holds it
    if fitted_on == "logits":
        with pytest.raises(DataError, match="probabilities, but the calibrator given was fitted on logits"):
            _apply(cal, _pred(probs, "probs"))
    else:
        np.testing.assert_allclose(_apply(cal, _pred(probs, "probs")), exported, atol=1e-5)
    assert np.isfinite(exported).all() and np.abs(exported.sum(0) - 1).max() < 1e-5


def test_the_log_probability_space_is_the_floored_log_softmax() -> None:
    z = torch.tensor([[50.0, 0.0, -50.0]]).T.reshape(1, 3, 1)  # p of the last class ~ 1e-44 < floor
    expected = torch.log(torch.softmax(z.double(), dim=1).clamp_min(PROB_FLOOR)).float()
    assert torch.allclose(to_space(z.clone(), "logits", "log_probs"), expected, atol=1e-6)
    assert float(to_space(z.clone(), "logits", "log_probs").min()) == pytest.approx(math.log(PROB_FLOOR))
    assert torch.equal(to_space(z.clone(), "logits", "logits"), z)


def test_files_without_the_record(tmp_path) -> None:
    """Written before the space was recorded: nnU-Net fits held probabilities; others are unknown
    (fed as they come, with a warning); a malformed record is refused naming the file."""
    assert recorded_space({"prediction_format": "nnunet"}) == "log_probs"
    assert recorded_space({"prediction_format": "segcalib"}) is None
    save_calibrator(fitted("vector"), tmp_path)
    document = json.loads((tmp_path / "calibrator.json").read_text())
    assert document["input_space"]["space"] == "logits"  # the library default: a model's logits
    del document["input_space"]
    (tmp_path / "calibrator.json").write_text(json.dumps(document))
    assert load_calibrator(tmp_path).input_space is None
    document["input_space"] = {"space": "probabilities"}
    (tmp_path / "calibrator.json").write_text(json.dumps(document))
    with pytest.raises(DataError, match=r"calibrator.json: 'input_space' must be an object with 'space' one of"):
        load_calibrator(tmp_path)


def test_old_behaviour_would_differ() -> None:
    """Feeding raw logits to a calibrator fitted on log-probabilities (what export --calibrator did)
    gives other maps: the conversion is what makes the two paths agree."""
    cal = fitted("vector")
    cal.input_space = "log_probs"
    logits = miscalibrated(SHAPES["3d"], seed=7)[0][0]
    raw = cal.transform(logits.unsqueeze(0)).numpy()[0]
    assert np.abs(raw - _export(cal, logits)).max() > 1e-3
    assert NUM_CLASSES == logits.shape[0]
