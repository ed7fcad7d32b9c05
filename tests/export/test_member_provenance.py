"""Issue 21, item 7: an ensemble of members trained on different manifests or configs is noted in
one warning line (seeds alone make no note); export.json records each member's manifest and hash."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from segcalib.export.members import note_member_provenance


def _member(manifest: str, seed: int, loss: str = "ce"):
    config = {"name": f"run{seed}", "data": {"manifest": manifest, "patch_size": [8, 8]},
              "loss": {"name": loss}, "train": {"seed": seed, "epochs": 2}}
    return SimpleNamespace(model=SimpleNamespace(cfg=SimpleNamespace(to_dict=lambda: config)))


def test_members_of_other_manifests_or_configs_are_noted_once(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="segcalib"):
        assert note_member_provenance([_member("a.json", 0), _member("a.json", 1), _member("a.json", 2)]) == []
        assert not caplog.records  # a seed ensemble: nothing to say
        changed = note_member_provenance([_member("a.json", 0), _member("b.json", 1, "mbls")])
    assert changed == ["data.manifest", "loss.name"]
    (record,) = caplog.records
    assert "different settings (data.manifest, loss.name)" in record.getMessage()
    assert "\n" not in record.getMessage()
