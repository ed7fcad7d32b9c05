"""Property-based tests: no manifest or config content produces anything but a clear error."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segcalib.config import load_config
from segcalib.data import load_manifest
from segcalib.errors import SegcalibError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 300) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
manifest_like = st.fixed_dictionaries(
    {},
    optional={
        "labels": st.dictionaries(st.sampled_from(["0", "1", "2", "x", "-1", "300"]), json_values, max_size=3),
        "modality": json_values,
        "training": st.lists(
            st.one_of(
                st.text(max_size=10),
                st.fixed_dictionaries({"image": json_values}, optional={"label": json_values, "case_id": json_values}),
                json_values,
            ),
            max_size=4,
        ),
        "validation": json_values,
        "test": json_values,
        "file_ending": json_values,
        "name": json_values,
    },
)
FOLDER = Path(tempfile.mkdtemp(prefix="segcalib-props-"))
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(manifest_like | json_values)
def test_manifest_parser_never_crashes(content) -> None:
    path = FOLDER / "dataset.json"
    path.write_text(json.dumps(content))
    try:
        load_manifest(path)
    except SegcalibError as exc:
        assert str(path) in str(exc)


@SETTINGS
@given(st.binary(max_size=200))
def test_manifest_bytes_never_crash(raw: bytes) -> None:
    path = FOLDER / "raw.json"
    path.write_bytes(raw)
    try:
        load_manifest(path)
    except SegcalibError:
        pass


config_like = st.fixed_dictionaries(
    {},
    optional={
        "name": json_values,
        "base": json_values,
        "data": st.fixed_dictionaries({}, optional={"manifest": json_values, "patch_size": json_values, "mode": json_values,
                                                    "spacing": json_values, "augment": json_values}) | json_values,
        "model": st.fixed_dictionaries({}, optional={"name": st.sampled_from(["unet", "smp_unet", "x"]) | json_values,
                                                     "channels": json_values}) | json_values,
        "loss": st.fixed_dictionaries({}, optional={"name": st.sampled_from(["ce", "mbls", "cals", "y"]) | json_values,
                                                    "margin": json_values}) | json_values,
        "train": st.dictionaries(st.sampled_from(["epochs", "lr", "seed", "amp", "bogus"]), json_values, max_size=3) | json_values,
        "inference": json_values,
    },
)


@SETTINGS
@given(config_like | json_values, st.lists(st.text(max_size=20), max_size=3))
def test_config_loader_never_crashes(content, overrides) -> None:
    import yaml

    path = FOLDER / "cfg.yaml"
    path.write_text(yaml.safe_dump(content))
    try:
        load_config(path, overrides)
    except SegcalibError:
        pass


@SETTINGS
@given(st.text(max_size=200))
def test_config_text_never_crashes(text: str) -> None:
    path = FOLDER / "text.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except SegcalibError:
        pass
