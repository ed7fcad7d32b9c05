"""``export.json``: what an output folder holds, so that reruns resume it, two different exports
never mix in one folder, and ``segcalib evaluate`` / ``report`` know what they are reading."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from segcalib import __version__
from segcalib.errors import RunError
from segcalib.utils.files import write_text_atomic

EXPORT_JSON = "export.json"


def versions() -> dict[str, str]:
    """Versions of what produced the maps."""
    import monai
    import nibabel

    return {
        "segcalib": __version__,
        "torch": str(torch.__version__),
        "monai": monai.__version__,
        "nibabel": nibabel.__version__,
        "python": platform.python_version(),
    }


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def previous_record(output: Path) -> dict[str, Any] | None:
    """The record of an earlier export into ``output``, if any."""
    path = output / EXPORT_JSON
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise RunError(f"{path}: unreadable; remove it or choose another --output") from None
    if not isinstance(record, dict):
        raise RunError(f"{path}: not an export record; remove it or choose another --output")
    return record


def differences(previous: dict[str, Any], settings: dict[str, Any], keys: Sequence[str]) -> list[str]:
    """The ``keys`` whose values differ between two records."""
    return [k for k in keys if previous.get(k) != settings.get(k)]


def claim_output(output: Path, settings: dict[str, Any], previous: dict[str, Any] | None, keys: Sequence[str]) -> None:
    """Refuse to mix two different exports in one folder (``keys`` must agree); record this one
    as running."""
    if previous is not None:
        changed = differences(previous, settings, keys)
        if changed:
            raise RunError(
                f"{output}: holds an export with other settings ({', '.join(changed)}); "
                "choose another --output or remove it"
            )
    elif output.exists() and any(output.glob("*_probs.nii.gz")):
        raise RunError(f"{output}: holds probability maps but no {EXPORT_JSON}; choose another --output")
    output.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output / EXPORT_JSON, json.dumps(settings, indent=1))


def finish(output: Path, settings: dict[str, Any], case_ids: Sequence[str]) -> dict[str, Any]:
    """Mark the record complete with the cases it holds."""
    settings.update(status="complete", cases=list(case_ids), finished=now())
    write_text_atomic(output / EXPORT_JSON, json.dumps(settings, indent=1))
    return settings
