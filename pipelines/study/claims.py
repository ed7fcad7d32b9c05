"""The papers' claims (the seed papers and their successors), each checked on the test cases by the paired seed-noise rule.

A claim says loss A calibrates better than loss B. Per seed, each run's test calibration is the
mean of its NLL, ECE all, ECE foreground and ECE boundary, each divided by the same seed's
uncalibrated CE+Dice value (the selection criterion, on test cases). Verdicts: *reproduced* (A lower,
beyond seed noise), *reversed* (A higher, beyond seed noise), *not reproduced* (within seed noise);
*only with post-hoc calibration* when the raw networks do not show it but the networks each with
their own cross-validated calibrator do.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Mapping

from pipelines.study.selection import METRICS, Paired, paired


@dataclass(frozen=True)
class Claim:
    text: str
    source: str
    better: str
    worse: str


CLAIMS = (
    Claim("CE+Dice is worse calibrated than CE", "baseline of MbLS (CVPR 2022) and NACL (MICCAI 2023)", "ce", "ce_dice"),
    Claim("Focal loss calibrates better than CE", "Mukhoti et al., NeurIPS 2020", "focal", "ce"),
    Claim("Sample-dependent focal loss (FLSD) calibrates better than focal loss", "Mukhoti et al., NeurIPS 2020",
          "focal_adaptive", "focal"),
    Claim("Soft Dice is worse calibrated than CE", "Mehrtash et al., IEEE TMI 2020", "ce", "dice"),
    Claim("Label smoothing calibrates better than CE", "Müller et al., NeurIPS 2019", "ls", "ce"),
    Claim("The confidence penalty calibrates better than CE", "Pereyra et al., ICLR-W 2017", "ecp", "ce"),
    Claim("SVLS calibrates better than label smoothing", "Islam & Glocker, IPMI 2021", "svls", "ls"),
    Claim("MbLS calibrates better than CE", "Liu et al., CVPR 2022", "mbls", "ce"),
    Claim("MbLS calibrates better than label smoothing", "Liu et al., CVPR 2022", "mbls", "ls"),
    Claim("MbLS calibrates better than focal loss", "Liu et al., CVPR 2022", "mbls", "focal"),
    Claim("A margin penalty calibrates CE+Dice", "Liu et al., CVPR 2022 (segmentation)", "mbls_dice", "ce_dice"),
    Claim("NACL calibrates better than MbLS", "Murugesan et al., MICCAI 2023", "nacl", "mbls"),
    Claim("NACL calibrates better than SVLS", "Murugesan et al., MICCAI 2023", "nacl", "svls"),
    Claim("CALS calibrates better than MbLS", "Liu et al., CALS, 2023", "cals", "mbls"),
    Claim("Hard L1-ACE added to Dice calibrates better than Dice alone", "Barfoot et al., TMI 2026 (ablation)",
          "hardl1ace_dice", "dice"),
    Claim("Hard L1-ACE + Dice calibrates better than the Dice + CE baseline", "Barfoot et al., TMI 2026",
          "hardl1ace_dice", "ce_dice"),
    Claim("Soft L1-ACE calibrates better than hard L1-ACE", "Barfoot et al., TMI 2026", "softl1ace_dice",
          "hardl1ace_dice"),
    Claim("CRaC calibrates better than CALS", "Murugesan et al., MICCAI 2024", "crac", "cals"),
    Claim("CRaC calibrates better than NACL", "Murugesan et al., MICCAI 2024", "crac", "nacl"),
)


def test_scores(summaries: Mapping[int, dict[str, Any]], reference: Mapping[int, dict[str, Any]]) -> dict[int, float]:
    """Per seed: mean of the four test metrics divided by the reference's (same seed)."""
    return {s: statistics.fmean(float(summaries[s][m]) / float(reference[s][m]) for m in METRICS)
            for s in summaries if s in reference}


def verdict(raw: Paired, calibrated: Paired | None) -> str:
    """The claim's verdict from the paired differences A - B (raw networks, then calibrated)."""
    if raw.beyond_noise:
        return "reproduced" if raw.mean < 0 else "reversed"
    if calibrated is not None and calibrated.beyond_noise and calibrated.mean < 0:
        return "only with post-hoc calibration"
    return "not reproduced (within seed noise)" if raw.n > 1 else "not decided (one seed)"


def check(claim: Claim, raw: Mapping[str, dict[int, float]], calibrated: Mapping[str, dict[int, float]]) -> tuple[str, Paired, Paired | None]:
    """Verdict of ``claim`` from per-loss per-seed test scores (``raw``: T = 1; ``calibrated``: best calibrator)."""
    d_raw = paired(raw[claim.better], raw[claim.worse])
    d_cal = None
    if claim.better in calibrated and claim.worse in calibrated:
        d_cal = paired(calibrated[claim.better], calibrated[claim.worse])
    return verdict(d_raw, d_cal), d_raw, d_cal
