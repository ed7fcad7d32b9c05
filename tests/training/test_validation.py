"""validate(): the overlapped loop (metrics of case i while case i+1 is predicted) gives exactly
the numbers of the sequential one, the adaptive loss's accumulated statistics included."""

from __future__ import annotations

import math

import torch

from segcalib.config import load_config
from segcalib.data import load_manifest
from segcalib.data.datasets import volume_dataset
from segcalib.inference.sliding_window import SlidingWindow
from segcalib.models import build_model
from segcalib.training.trainer import build_loss_for
from segcalib.training.validation import validate
from tests.conftest import SMOKE_CONFIG


def test_overlapped_validation_equals_the_sequential_one_exactly() -> None:
    cfg = load_config(SMOKE_CONFIG, ["loss.name=cals"])
    manifest = load_manifest(cfg.data.manifest, split_seed=cfg.data.split_seed)
    # every labelled case of the smoke data, so that more than two cases pass through the overlap
    cases = [c for split in ("training", "validation") for c in manifest.labelled(split)]
    volumes = volume_dataset(cfg.data, cases)
    torch.manual_seed(0)
    net = build_model(cfg.model.name, spatial_dims=3, in_channels=1, out_channels=3, **cfg.model.params)
    window = SlidingWindow.from_config(cfg)
    results, states = [], []
    for overlap in (False, True):
        loss_fn = build_loss_for(cfg, manifest.num_classes)
        results.append(validate(net, volumes, window, loss_fn, 3, torch.device("cpu"), update_adaptive_loss=True, overlap=overlap))
        states.append(loss_fn.state_dict())
    sequential, overlapped = results
    assert sequential.n_cases == overlapped.n_cases == len(cases) >= 3
    assert sequential.per_case_dice == overlapped.per_case_dice
    for name in ("loss", "ece", "nll"):
        a, b = getattr(sequential, name), getattr(overlapped, name)
        assert math.isfinite(a) and a == b, name
    assert sequential.dice_per_class == overlapped.dice_per_class
    assert states[0].keys() == states[1].keys()
    accumulated = 0
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key
        accumulated += int(value.abs().sum() > 0)
    assert accumulated > 0  # the adaptive loss did see the cases
    assert net.training  # left in the mode it was in
