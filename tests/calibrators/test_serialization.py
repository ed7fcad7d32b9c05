"""calibrator.json / weights.safetensors: contents, extra facts, tensors, and every malformed input."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from segcalib.calibrators import build_calibrator, load_calibrator, read_calibrator_json, save_calibrator
from segcalib.calibrators import registry
from segcalib.calibrators.base import read_array
from segcalib.calibrators.temperature import TemperatureScaling
from segcalib.errors import DataError
from tests.calibrators._helpers import NUM_CLASSES, SHAPES, miscalibrated


def _fitted(name: str = "matrix"):
    cal = build_calibrator(name, NUM_CLASSES, **({"lambda_reg": 0.01} if name == "matrix" else {}))
    logits, target, _ = miscalibrated(SHAPES["3d"], seed=0)
    cal.update(logits, target)
    return cal.fit()


def test_json_holds_method_classes_params_and_extra(tmp_path) -> None:
    cal = _fitted()
    path = save_calibrator(cal, tmp_path, extra={"fit_region": "foreground", "voxels_used": 240})
    assert path == tmp_path / "calibrator.json"
    doc = json.loads(path.read_text())
    assert doc["method"] == "matrix" and doc["classes"] == NUM_CLASSES and doc["tensors"] == []
    assert doc["fit_region"] == "foreground" and doc["voxels_used"] == 240
    assert doc["params"]["lambda_reg"] == 0.01 and len(doc["params"]["weight"]) == NUM_CLASSES
    assert read_calibrator_json(tmp_path)["voxels_used"] == 240
    assert not (tmp_path / "weights.safetensors").exists()
    assert load_calibrator(tmp_path).get_params() == cal.get_params()


def test_temperature_is_saved_under_temperature(tmp_path) -> None:
    cal = _fitted("temperature")
    save_calibrator(cal, tmp_path)
    doc = json.loads((tmp_path / "calibrator.json").read_text())
    assert doc["params"]["temperature"] == cal.temperature > 1.5


def test_reserved_extra_keys_and_unfitted_calibrators_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="reserved"):
        save_calibrator(_fitted(), tmp_path, extra={"params": 1})
    with pytest.raises(RuntimeError, match="not fitted"):
        save_calibrator(build_calibrator("vector", NUM_CLASSES), tmp_path)
    assert not (tmp_path / "calibrator.json").exists()


def _rewrite(folder, **changes: Any) -> None:
    path = folder / "calibrator.json"
    doc = json.loads(path.read_text())
    for key, value in changes.items():
        if key.startswith("params."):
            doc["params"][key[len("params."):]] = value
        else:
            doc[key] = value
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"method": "nope"}, "unknown calibrator 'nope'"),
        ({"classes": 1}, "'classes' must be an integer >= 2"),
        ({"format_version": 7}, "format_version 7"),
        ({"params": [1, 2]}, "'params' must be an object"),
        ({"params.weight": [[1.0, 0.0], [0.0, 1.0]]}, "parameter 'weight' must be finite numbers of shape \\[3, 3\\]"),
        ({"params.bias": "zero"}, "parameter 'bias' must be a list of numbers"),
        ({"params.lambda_reg": -1.0}, "lambda_reg must be a finite number >= 0"),
        ({"tensors": ["table"]}, "weights.safetensors: missing"),
    ],
)
def test_malformed_json_is_a_data_error_naming_the_file(tmp_path, changes: dict, message: str) -> None:
    save_calibrator(_fitted(), tmp_path)
    _rewrite(tmp_path, **changes)
    with pytest.raises(DataError, match=message) as info:
        load_calibrator(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_unreadable_files_are_data_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="missing calibrator.json"):
        load_calibrator(tmp_path)
    (tmp_path / "calibrator.json").write_text("{not json")
    with pytest.raises(DataError, match="calibrator.json: not a readable calibrator file"):
        load_calibrator(tmp_path)
    (tmp_path / "calibrator.json").write_text(
        '{"format_version": 1, "method": "temperature", "classes": 3, "params": {"temperature": NaN}}'
    )
    with pytest.raises(DataError, match="NaN is not a valid number"):
        load_calibrator(tmp_path)


def test_non_positive_temperature_is_refused(tmp_path) -> None:
    save_calibrator(_fitted("temperature"), tmp_path)
    _rewrite(tmp_path, **{"params.temperature": -2.0})
    with pytest.raises(DataError, match="'temperature' must be a finite positive number"):
        load_calibrator(tmp_path)


class _WithTable(TemperatureScaling):
    """Temperature scaling plus a per-class table, only to exercise the tensor path of the format."""

    def _fit_sample(self, logits, labels, weights) -> None:
        super()._fit_sample(logits, labels, weights)
        self.table = torch.bincount(labels, minlength=self.num_classes).double()

    def tensors(self) -> dict[str, torch.Tensor]:
        self._check_fitted()
        return {"table": self.table}

    def _load_state(self, state, tensors) -> None:
        super()._load_state(state, tensors)
        if "table" not in tensors:
            raise DataError("tensor 'table' is missing")
        self.table = read_array(self.name, {"table": tensors["table"].tolist()}, "table", (self.num_classes,))


@pytest.fixture
def with_table(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "with_table", _WithTable)
    monkeypatch.setattr(_WithTable, "name", "with_table")
    cal = _WithTable(NUM_CLASSES)
    logits, target, _ = miscalibrated(SHAPES["2d"], seed=1)
    cal.update(logits, target)
    return cal.fit()


def test_tensors_round_trip_through_safetensors(tmp_path, with_table) -> None:
    save_calibrator(with_table, tmp_path)
    assert json.loads((tmp_path / "calibrator.json").read_text())["tensors"] == ["table"]
    loaded = load_calibrator(tmp_path)
    assert torch.equal(loaded.table, with_table.table) and float(loaded.table.sum()) == 2 * 9 * 8
    # a later method without tensors removes the stale weights file
    save_calibrator(_fitted("temperature"), tmp_path)
    assert not (tmp_path / "weights.safetensors").exists()


def test_corrupt_or_mismatched_weights_are_data_errors(tmp_path, with_table) -> None:
    from safetensors.torch import save_file

    save_calibrator(with_table, tmp_path)
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"\x00" * 5)
    with pytest.raises(DataError, match="weights.safetensors: not a readable safetensors file"):
        load_calibrator(tmp_path)
    save_file({"other": torch.zeros(3)}, str(weights))
    with pytest.raises(DataError, match=r"holds tensors \['other'\], calibrator.json lists \['table'\]"):
        load_calibrator(tmp_path)
    save_file({"table": torch.zeros(5)}, str(weights))
    with pytest.raises(DataError, match="'table' must be finite numbers of shape \\[3\\]"):
        load_calibrator(tmp_path)
