"""segcalib's nnU-Net v2 trainers: the loss nnU-Net trains with, deep supervision, ignore label,
CALS multipliers from validation batches and nnU-Net's checkpoint, the generic trainer's checks."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("nnunetv2")

from nnunetv2.training.nnUNetTrainer.variants.loss.nnUNetTrainerCELoss import nnUNetTrainerCELoss  # noqa: E402
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name  # noqa: E402

from segcalib.errors import ConfigError  # noqa: E402
from segcalib.integrations.nnunet import TRAINER_LOSSES, trainer_folder  # noqa: E402
from segcalib.integrations.nnunet import trainers as segcalib_trainers  # noqa: E402
from segcalib.integrations.nnunet.trainers import (  # noqa: E402
    CHECKPOINT_KEY,
    nnUNetTrainerSegcalib,
    nnUNetTrainerSegcalibCALS,
    nnUNetTrainerSegcalibCE,
    nnUNetTrainerSegcalibMbLS,
)
from segcalib.losses import build_loss, loss_parameters  # noqa: E402
from tests.integrations.nnunet_plans import PATCH, STRIDES  # noqa: E402

NUM_CLASSES = 3


def ds_weights_by_hand() -> list[float]:
    """nnU-Net's rule, written out: scales = cumulative strides minus the coarsest; weight
    1/2^i per scale, the lowest set to 0, normalised to sum 1. Four stages -> 3 scales -> 2/3, 1/3, 0."""
    n_scales = len(STRIDES) - 1
    raw = [1 / 2**i for i in range(n_scales)]
    raw[-1] = 0.0
    return [w / sum(raw) for w in raw]


def ds_shapes() -> list[list[int]]:
    shapes, factor = [], np.array([1, 1])
    for stride in STRIDES[:-1]:
        factor = factor * np.array(stride)
        shapes.append([p // int(f) for p, f in zip(PATCH, factor)])
    return shapes


def random_ds_batch(seed: int, batch: int = 2, ignore: int | None = None):
    """Deep-supervision logits (float64) and float targets ``(B, 1, *S)`` as nnU-Net's loader gives."""
    g = torch.Generator().manual_seed(seed)
    outputs, targets = [], []
    for shape in ds_shapes():
        outputs.append((3 * torch.randn(batch, NUM_CLASSES, *shape, generator=g, dtype=torch.float64)).requires_grad_())
        target = torch.randint(0, NUM_CLASSES, (batch, 1, *shape), generator=g)
        if ignore is not None:
            target[torch.rand(target.shape, generator=g) < 0.3] = ignore
        targets.append(target.float())
    return outputs, targets


def test_deep_supervision_weights_are_nnunets_and_as_derived_by_hand(make_trainer) -> None:
    trainer = make_trainer(nnUNetTrainerSegcalibMbLS)
    assert ds_weights_by_hand() == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert list(trainer.loss.weight_factors) == pytest.approx(ds_weights_by_hand(), abs=1e-15)
    assert [list(o.shape[2:]) for o in trainer.network(torch.zeros(1, 1, *PATCH))] == ds_shapes()


def data_params(name: str, ignore: int | None = None) -> dict:
    """What nnU-Net's dataset.json gives the loss: the class count where it takes one, the ignore label."""
    params = {"num_classes": NUM_CLASSES} if "num_classes" in loss_parameters(name) else {}
    return params if ignore is None else {**params, "ignore_index": ignore}


@pytest.mark.parametrize("cls", [getattr(segcalib_trainers, name) for name in TRAINER_LOSSES], ids=lambda c: c.__name__)
def test_trainer_loss_is_the_weighted_sum_of_segcalibs_loss_at_each_scale(make_trainer, cls) -> None:
    trainer = make_trainer(cls)
    outputs, targets = random_ds_batch(seed=1)
    name = TRAINER_LOSSES[cls.__name__]
    reference = build_loss(name, **data_params(name))
    expected = sum(w * reference(o, t) for w, o, t in zip(ds_weights_by_hand(), outputs, targets))
    got = trainer.loss(outputs, targets)
    assert got.dtype == torch.float64
    assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=1e-12)
    # the coarsest scale has weight 0: its logits get no gradient, the others do
    got.backward()
    assert outputs[2].grad is None and outputs[0].grad.abs().sum() > 0 and outputs[1].grad.abs().sum() > 0


def test_ce_trainer_equals_nnunets_own_ce_trainer(make_trainer) -> None:
    """nnU-Net's ``nnUNetTrainerCELoss`` (its RobustCrossEntropyLoss in its DS wrapper) is the anchor."""
    ours = make_trainer(nnUNetTrainerSegcalibCE, initialize=False)
    theirs = make_trainer(nnUNetTrainerCELoss, initialize=False)
    outputs, targets = random_ds_batch(seed=2)
    assert float(ours._build_loss()(outputs, targets)) == pytest.approx(float(theirs._build_loss()(outputs, targets)), rel=1e-12)


def test_ignore_label_is_the_losses_ignore_index(make_trainer) -> None:
    ce = make_trainer(nnUNetTrainerSegcalibCE, ignore=True)
    outputs, targets = random_ds_batch(seed=3, ignore=3)
    expected = sum(w * F.cross_entropy(o, t[:, 0].long(), ignore_index=3)
                   for w, o, t in zip(ds_weights_by_hand(), outputs, targets))
    assert float(ce.loss(outputs, targets)) == pytest.approx(float(expected.detach()), rel=1e-12)

    mbls = make_trainer(nnUNetTrainerSegcalibMbLS, ignore=True)
    assert mbls.segcalib_loss.ignore_index == 3
    value = mbls.loss(outputs, targets)
    value.backward()
    changed = []
    for o, t, w in zip(outputs, targets, ds_weights_by_hand()):
        ignored = (t == 3).expand_as(o)
        assert ignored.any()
        if w > 0:  # ignored voxels do not pull on the logits, the others do
            assert torch.all(o.grad[ignored] == 0) and o.grad[~ignored].abs().sum() > 0
        changed.append(torch.where(ignored, o.detach() + 50 * torch.randn_like(o), o.detach()))
    assert float(mbls.loss(changed, targets)) == pytest.approx(float(value.detach()), rel=1e-12)


@pytest.mark.parametrize("cls", [getattr(segcalib_trainers, name) for name in TRAINER_LOSSES], ids=lambda c: c.__name__)
def test_region_based_labels_are_refused_naming_the_key_before_any_folder_is_made(make_trainer, nnunet_dirs, cls) -> None:
    with pytest.raises(ConfigError, match=rf"region-based labels.*'regions_class_order'.*'{TRAINER_LOSSES[cls.__name__]}'"):
        make_trainer(cls, regions=True)
    assert not (nnunet_dirs / "nnUNet_results").exists()


def test_region_based_labels_are_refused_for_the_generic_trainer_too(make_trainer, nnunet_dirs, monkeypatch) -> None:
    monkeypatch.setenv("SEGCALIB_LOSS", "softl1ace_dice")
    with pytest.raises(ConfigError, match=r"dataset\.json: region-based labels.*'regions_class_order'.*'softl1ace_dice'"):
        make_trainer(nnUNetTrainerSegcalib, regions=True)
    assert not (nnunet_dirs / "nnUNet_results").exists()


def test_nnunets_trainer_lookup_finds_every_trainer_through_nnUNet_extTrainer(nnunet_dirs, monkeypatch) -> None:
    names = ["nnUNetTrainerSegcalib", *TRAINER_LOSSES]
    assert {"nnUNetTrainerSegcalibMbLS", "nnUNetTrainerSegcalibCALS", "nnUNetTrainerSegcalibNACL",
            "nnUNetTrainerSegcalibCE"} <= set(names)
    with pytest.raises(RuntimeError, match="nnUNet_extTrainer"):
        recursive_find_trainer_class_by_name("nnUNetTrainerSegcalibMbLS")
    monkeypatch.setenv("nnUNet_extTrainer", str(trainer_folder()))
    for name in names:
        found = recursive_find_trainer_class_by_name(name)
        assert found is getattr(segcalib_trainers, name)  # the package's class, not a second copy


def test_log_names_the_loss_and_every_parameter(make_trainer) -> None:
    trainer = make_trainer(nnUNetTrainerSegcalibMbLS, initialize=False, ignore=True)
    log = open(trainer.log_file).read()
    assert "segcalib loss 'mbls' with margin=10.0, alpha=0.1, ignore_index=3 (from nnUNetTrainerSegcalibMbLS)" in log


# --------------------------------------------------------------------------------------------
# the newer losses (L1-ACE and its combinations, CRaC) through the generic trainer

GENERIC_LOSSES = [
    ("hardl1ace", {"num_bins": 10}),
    ("softl1ace", {"empty_weight": 0.02}),
    ("hardl1ace_dice", {}),
    ("softl1ace_dice", {"dice_weight": 0.3}),
    ("hardl1ace_ce", {"ace_weight": 0.7, "ce_weight": 0.3}),
    ("softl1ace_ce", {}),
    ("hardl1ace_dice_ce", {"include_background": False}),
    ("softl1ace_dice_ce", {}),
    ("crac", {"margin": 3.0, "boundary_mm": 1.0}),
]


@pytest.mark.parametrize("ignore", [None, 3], ids=["no_ignore", "ignore_label"])
@pytest.mark.parametrize(("name", "params"), GENERIC_LOSSES, ids=[n for n, _ in GENERIC_LOSSES])
def test_generic_trainer_loss_equals_segcalibs_loss_at_every_scale(make_trainer, monkeypatch, name, params, ignore) -> None:
    """float64 logits: the segcalib loss inside the trainer equals the registry's loss on each
    deep-supervision scale, and the trainer's loss is nnU-Net's weighted sum of them; voxels of
    nnU-Net's ignore label do not count."""
    monkeypatch.setenv("SEGCALIB_LOSS", name)
    monkeypatch.setenv("SEGCALIB_LOSS_PARAMS", json.dumps(params))
    trainer = make_trainer(nnUNetTrainerSegcalib, ignore=ignore is not None)
    reference = build_loss(name, **params, **data_params(name, ignore))
    outputs, targets = random_ds_batch(seed=6, ignore=ignore)
    per_scale = [reference(o, t) for o, t in zip(outputs, targets)]
    for scale, (o, t, expected) in enumerate(zip(outputs, targets, per_scale)):
        got = trainer.segcalib_loss(o, t)
        assert got.dtype == torch.float64
        assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=1e-12, abs=1e-15), scale
    assert len({round(float(v.detach()), 9) for v in per_scale}) == len(per_scale)  # the scales differ
    value = trainer.loss(outputs, targets)
    weighted = sum(w * v for w, v in zip(ds_weights_by_hand(), per_scale))
    assert float(value.detach()) == pytest.approx(float(weighted.detach()), rel=1e-12)
    if ignore is not None:
        changed = [torch.where(t == ignore, o.detach() + 50 * torch.randn_like(o), o.detach()) for o, t in zip(outputs, targets)]
        assert float(trainer.loss(changed, targets)) == pytest.approx(float(value.detach()), rel=1e-12)


def test_named_l1ace_trainers_train_with_the_registrys_defaults(make_trainer) -> None:
    for cls_name, loss in (("nnUNetTrainerSegcalibHardL1ACE", "hardl1ace"), ("nnUNetTrainerSegcalibSoftL1ACE", "softl1ace"),
                           ("nnUNetTrainerSegcalibHardL1ACEDiceCE", "hardl1ace_dice_ce"),
                           ("nnUNetTrainerSegcalibSoftL1ACEDiceCE", "softl1ace_dice_ce")):
        trainer = make_trainer(getattr(segcalib_trainers, cls_name), initialize=False)
        assert trainer.segcalib_loss.name == loss and trainer.segcalib_params == {}


def test_crac_multipliers_see_the_ignore_label_before_nnunet_overwrites_it(make_trainer) -> None:
    """nnU-Net's ``validation_step`` sets ignored target voxels to 0 after its loss call (for its pseudo
    Dice); CRaC's validation statistics must be those of the targets with the ignore label."""
    trainer = make_trainer(segcalib_trainers.nnUNetTrainerSegcalibCRaC, ignore=True)
    g = torch.Generator().manual_seed(7)
    batches = validation_batches(seed=8)
    for b in batches:
        for t in b["target"]:
            t[torch.rand(t.shape, generator=g) < 0.3] = 3
    trainer.network.eval()
    reference = build_loss("crac", **data_params("crac", ignore=3))
    with torch.no_grad():
        for b in batches:
            reference.accumulate(trainer.network(b["data"])[0], b["target"][0].clone())
        trainer.on_validation_epoch_start()
        outputs = [trainer.validation_step({**b, "target": [t.clone() for t in b["target"]]}) for b in batches]
    ours = trainer.segcalib_loss
    assert float(ours._count) == float(reference._count) < sum(b["target"][0].numel() for b in batches)
    torch.testing.assert_close(ours._sums, reference._sums, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ours._region_count, reference._region_count)
    trainer.on_validation_epoch_end(outputs)
    reference.step()
    torch.testing.assert_close(ours.lambdas, reference.lambdas, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------
# CALS: multipliers from validation batches, in nnU-Net's checkpoint


def validation_batches(seed: int, n: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        data = torch.randn(2, 1, *PATCH, generator=g)
        targets = [torch.randint(0, NUM_CLASSES, (2, 1, *s), generator=g).float() for s in ds_shapes()]
        batches.append({"data": data, "target": targets, "keys": ["a", "b"]})
    return batches


def cals_lambdas_by_hand(logits: torch.Tensor, margin: float = 10.0, lam: float = 1e-6, rho: float = 1.0) -> np.ndarray:
    """SPEC §2 with PHR at the initial lambda, rho, in float64: mean over voxels of clamp(P'(h))."""
    z = logits.double().movedim(1, -1).reshape(-1, logits.shape[1])
    h = (z.max(1, keepdim=True).values - z - margin) / margin
    x = lam + rho * h
    slope = torch.where(x >= 0, x, torch.zeros_like(x)).clamp(1e-6, 1e6)
    return slope.mean(0).clamp(1e-6, 1e6).numpy()


def run_validation_epoch(trainer, batches: list[dict]) -> None:
    with torch.no_grad():
        trainer.on_validation_epoch_start()
        outputs = [trainer.validation_step({**b, "target": [t.clone() for t in b["target"]]}) for b in batches]
        trainer.on_validation_epoch_end(outputs)


def scaled_network(trainer) -> None:
    """Large weights in the last layer so that some logit distances exceed the margin (lambda moves visibly)."""
    with torch.no_grad():
        for seg in trainer.network.decoder.seg_layers:
            seg.weight.mul_(400.0)


def test_cals_multipliers_follow_spec_after_a_validation_epoch_and_survive_the_checkpoint(make_trainer, nnunet_dirs) -> None:
    trainer = make_trainer(nnUNetTrainerSegcalibCALS)
    scaled_network(trainer)
    batches = validation_batches(seed=4)
    trainer.network.eval()
    with torch.no_grad():
        logits = torch.cat([trainer.network(b["data"])[0] for b in batches])
    expected = cals_lambdas_by_hand(logits)
    assert (expected > 1e-3).all()  # the case means something: every class's multiplier moves

    run_validation_epoch(trainer, batches)
    loss = trainer.segcalib_loss
    np.testing.assert_allclose(loss.lambdas.double().numpy(), expected, rtol=1e-5)
    assert int(loss.epoch) == 1
    assert "segcalib cals: lambda_0=" in open(trainer.log_file).read()

    path = str(nnunet_dirs / "checkpoint.pth")
    trainer.save_checkpoint(path)
    with torch.serialization.safe_globals(segcalib_trainers._numpy_data_types()):  # numpy scalars: nnU-Net's logging
        saved = torch.load(path, map_location="cpu", weights_only=True)
    assert saved["trainer_name"] == "nnUNetTrainerSegcalibCALS" and "network_weights" in saved  # nnU-Net's own keys kept
    entry = saved[CHECKPOINT_KEY]
    assert entry["name"] == "cals" and entry["params"] == {"num_classes": 3}
    assert all(isinstance(v, torch.Tensor) for v in entry["state"].values())

    fresh = make_trainer(nnUNetTrainerSegcalibCALS)
    assert torch.all(fresh.segcalib_loss.lambdas == 1e-6)
    fresh.load_checkpoint(path)
    for key, value in loss.state_dict().items():
        assert torch.equal(fresh.segcalib_loss.state_dict()[key], value), key
    # the tap feeds the restored loss itself: one more epoch continues from the saved state
    run_validation_epoch(fresh, batches)
    assert int(fresh.segcalib_loss.epoch) == 2


def test_checkpoint_of_another_loss_is_refused(make_trainer, nnunet_dirs, monkeypatch) -> None:
    trainer = make_trainer(nnUNetTrainerSegcalibCALS)
    path = str(nnunet_dirs / "checkpoint.pth")
    trainer.save_checkpoint(path)
    monkeypatch.setenv("SEGCALIB_LOSS", "cals")
    monkeypatch.setenv("SEGCALIB_LOSS_PARAMS", json.dumps({"margin": 5}))
    other = make_trainer(nnUNetTrainerSegcalib)
    with pytest.raises(ConfigError, match="trained with segcalib loss 'cals'.*margin"):
        other.load_checkpoint(path)


# --------------------------------------------------------------------------------------------
# the generic trainer: SEGCALIB_LOSS / SEGCALIB_LOSS_PARAMS


def test_generic_trainer_builds_the_loss_from_the_environment(make_trainer, monkeypatch) -> None:
    monkeypatch.setenv("SEGCALIB_LOSS", "mbls")
    monkeypatch.setenv("SEGCALIB_LOSS_PARAMS", '{"margin": 5, "alpha": 0.2}')
    trainer = make_trainer(nnUNetTrainerSegcalib)
    assert (trainer.segcalib_loss.name, trainer.segcalib_loss.margin, trainer.segcalib_loss.alpha) == ("mbls", 5.0, 0.2)
    assert "segcalib loss 'mbls' with margin=5, alpha=0.2, ignore_index=-100" in open(trainer.log_file).read()


@pytest.mark.parametrize(
    ("loss", "params", "message"),
    [
        (None, None, r"SEGCALIB_LOSS: not set"),
        ("mlbs", None, r"unknown loss 'mlbs'"),
        ("mbls", '{"margn": 5}', r"SEGCALIB_LOSS_PARAMS: loss\.margn: unknown parameter"),
        ("mbls", '{"margin": -1}', r"parameter 'margin' must be"),
        ("cals", '{"num_classes": 4}', r"loss\.num_classes: follows from nnU-Net's dataset\.json"),
        ("mbls", "{margin: 5}", r"SEGCALIB_LOSS_PARAMS: not valid JSON"),
        ("mbls", "[5]", r"SEGCALIB_LOSS_PARAMS: must be a JSON object"),
    ],
)
def test_generic_trainer_rejects_bad_settings_naming_the_key(make_trainer, nnunet_dirs, monkeypatch, loss, params, message) -> None:
    if loss is not None:
        monkeypatch.setenv("SEGCALIB_LOSS", loss)
    if params is not None:
        monkeypatch.setenv("SEGCALIB_LOSS_PARAMS", params)
    with pytest.raises(ConfigError, match=message):
        make_trainer(nnUNetTrainerSegcalib)
    assert not (nnunet_dirs / "nnUNet_results").exists()  # checked before nnU-Net makes its folders
    assert os.environ.get("nnUNet_results")


def test_log_says_what_nnUNet_extTrainer_prediction_needs(make_trainer, monkeypatch) -> None:
    """Set: the value training found the class through; unset: segcalib's folder, plus the folder of
    a subclass's module when the subclass lives elsewhere (here: this test module's folder)."""
    from segcalib.integrations.nnunet.trainers import ext_trainer_value

    trainer = make_trainer(nnUNetTrainerSegcalibMbLS, initialize=False)
    assert f"set it as for training: export nnUNet_extTrainer={trainer_folder()}" in open(trainer.log_file).read()
    assert ext_trainer_value(nnUNetTrainerSegcalibCALS, {}) == str(trainer_folder())
    mine = type("nnUNetTrainerMine", (nnUNetTrainerSegcalibMbLS,), {"__module__": __name__})
    here = os.path.dirname(os.path.abspath(__file__))
    assert ext_trainer_value(mine, {}) == os.pathsep.join([str(trainer_folder()), here])
    assert ext_trainer_value(mine, {"nnUNet_extTrainer": "/a:/b"}) == "/a:/b"
