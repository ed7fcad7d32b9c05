"""``export.json``: what an output folder holds, so that reruns resume it, two different exports
never mix in one folder, and ``segcalib evaluate`` / ``report`` know what they are reading."""

from __future__ import annotations

import contextlib
import json
import platform
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from segcalib import __version__
from segcalib.errors import ConfigError, DataError, RunError
from segcalib.predictions.layout import EXPORT_JSON, has_value_maps
from segcalib.utils.files import write_text_atomic


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
    elif output.exists() and has_value_maps(output):
        raise RunError(f"{output}: holds probability or logit maps but no {EXPORT_JSON}; choose another --output")
    output.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output / EXPORT_JSON, json.dumps(settings, indent=1))


@contextlib.contextmanager
def claimed_output(
    output: Path, settings: dict[str, Any], previous: dict[str, Any] | None, keys: Sequence[str]
) -> Iterator[None]:
    """:func:`claim_output` for the block; a refusal inside it (a DataError or ConfigError: a map
    that fails its checks, a case of another kind) puts the folder back as it was: the files this
    command added are removed and ``export.json`` is restored (or removed). A full disk or an
    interruption is no refusal: the complete maps stay, and the rerun resumes. The caller holds
    the folder's lock, so every file that appears meanwhile is this command's."""
    existed = output.is_dir()
    before = {p.name for p in output.iterdir()} if existed else set()
    record = output / EXPORT_JSON
    old_text = record.read_text(encoding="utf-8") if record.is_file() else None
    claim_output(output, settings, previous, keys)
    try:
        yield
    except (DataError, ConfigError):
        for path in output.iterdir():
            if path.name not in before and path.is_file():
                path.unlink(missing_ok=True)
        if old_text is None:
            record.unlink(missing_ok=True)
        else:
            write_text_atomic(record, old_text)
        if not existed:
            with contextlib.suppress(OSError):
                output.rmdir()  # made by claim_output; kept if anything else is in it
        raise


def finish(output: Path, settings: dict[str, Any], case_ids: Sequence[str]) -> dict[str, Any]:
    """Mark the record complete with the cases it holds."""
    settings.update(status="complete", cases=list(case_ids), finished=now())
    write_text_atomic(output / EXPORT_JSON, json.dumps(settings, indent=1))
    return settings
