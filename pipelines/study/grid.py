"""The grid of training runs: one :class:`Job` per (regime, loss, seed), its config overrides and folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from segcalib.experiment import BASELINE_LOSS

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "hippocampus"
BASELINE = BASELINE_LOSS  # CE+Dice: every candidate is measured against it
SEED_PAPER_LOSSES = ("ce", "focal", "ls", "svls", "nacl", "mbls", "mbls_dice", "cals")  # the seed papers' losses
OTHER_LOSSES = ("ecp", "dice", "focal_adaptive", "logit_l1", "cals_heuristic", "hardl1ace_dice", "softl1ace_dice", "crac")  # and those added since
LOSSES = (BASELINE, *SEED_PAPER_LOSSES, *OTHER_LOSSES)
LONG_LOSSES = ("ce", "ce_dice", "focal", "ls", "ecp", "svls", "nacl", "mbls", "mbls_dice", "cals")  # study v1's ten
NONE = "none"  # the "no calibrator" candidate
LONG_TOP = 3  # the long regime trains CE+Dice and the short regime's top three losses
REGIMES = ("short", "long")
SMOKE_MANIFEST = REPO / "data_manifests" / "hippocampus_smoke.json"
SMOKE_OVERRIDES = (
    f"data.manifest={SMOKE_MANIFEST}",
    "model.channels=[4,8,16,32]",
    "model.num_res_units=0",
)
SMOKE_EPOCHS = 1


@dataclass(frozen=True, order=True)
class Job:
    """One training run of the grid."""

    regime: str
    loss: str
    seed: int

    @property
    def folder(self) -> str:
        return f"{self.regime}/{self.loss}/seed{self.seed}"

    @property
    def config(self) -> Path:
        return CONFIGS / f"{self.loss}.yaml"


@dataclass(frozen=True)
class GridSettings:
    """What every run of one study invocation shares (picklable: sent to worker processes)."""

    out: Path
    long_factor: int = 2
    epochs: int | None = None  # the short regime's epochs (None: the config's)
    extra: tuple[str, ...] = ()  # --set overrides for every run (smoke sizes included)
    device: str | None = None


def regime_overrides(regime: str, base_epochs: int, long_factor: int) -> list[str]:
    """``long``: ``long_factor`` times the epochs at a constant learning rate (CE turns over-confident)."""
    if regime == "short":
        return []
    return [f"train.epochs={base_epochs * long_factor}", "train.scheduler=none", f"train.val_every={5 * long_factor}"]


def job_overrides(job: Job, settings: GridSettings, config_epochs: int) -> list[str]:
    """Config overrides of ``job``: seed, name, regime schedule, ``--set`` values, device."""
    short_epochs = settings.epochs or config_epochs
    overrides = [f"train.seed={job.seed}", f"name=study_{job.folder.replace('/', '_')}"]
    overrides += list(settings.extra)
    overrides += [f"train.epochs={short_epochs}"] + regime_overrides(job.regime, short_epochs, settings.long_factor)
    if settings.device:
        overrides.append(f"train.device={settings.device}")
    return overrides


def priority_order(seeds: Sequence[int], losses: Sequence[str] = LOSSES) -> list[Job]:
    """The short regime's units in the fixed order in which the grid fills: CE+Dice's seeds, then the
    seed papers' losses seed by seed, then the other losses seed by seed (``losses`` filters)."""
    tiers = [(BASELINE,), SEED_PAPER_LOSSES, tuple(l for l in losses if l not in (BASELINE, *SEED_PAPER_LOSSES))]
    jobs = []
    for tier in tiers:
        jobs += [Job("short", loss, seed) for seed in seeds for loss in tier if loss in losses]
    return jobs


def must_have_short(seeds: Sequence[int]) -> list[Job]:
    """The short-regime units whose records the long regime's choice waits for."""
    return [Job("short", loss, seed) for loss in (BASELINE, *SEED_PAPER_LOSSES) for seed in seeds]


def make_jobs(regimes: Sequence[str], losses: Sequence[str], long_losses: Sequence[str], seeds: Sequence[int]) -> list[Job]:
    """Every (regime, loss, seed); the long regime trains only ``long_losses`` (the baseline always)."""
    jobs = []
    for regime in regimes:
        chosen = [l for l in losses if regime == "short" or l in long_losses or l == BASELINE]
        jobs += [Job(regime, loss, seed) for loss in chosen for seed in seeds]
    return jobs
