"""Registries fill themselves: public modules are imported, private and framework ones are not."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from segcalib.losses import list_losses
from segcalib.models import list_models
from segcalib.utils.plugins import import_submodules


def test_imports_public_modules_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "plugpkg"
    package.mkdir()
    (package / "__init__.py").write_text("LOADED = []\n")
    for name in ("beta", "alpha", "_private", "registry"):
        (package / f"{name}.py").write_text(f"from plugpkg import LOADED\nLOADED.append({name!r})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        import plugpkg

        assert import_submodules("plugpkg", plugpkg.__path__, framework={"registry"}) == ["alpha", "beta"]
        assert plugpkg.LOADED == ["alpha", "beta"]
    finally:
        for name in [m for m in sys.modules if m == "plugpkg" or m.startswith("plugpkg.")]:
            del sys.modules[name]


def test_every_loss_and_model_file_is_registered() -> None:
    assert "cals_heuristic" in list_losses() and "svls" in list_losses()  # cals.py, svls.py
    assert {"unet", "smp_unet"} <= set(list_models())  # monai_nets.py, smp_nets.py
