"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint holds only tensors and plain containers, so loading it never runs code from the
file: model, optimiser, scheduler and grad-scaler states, the loss state (CALS multipliers),
the epoch, the best score, the RNG states and the resolved config with its hash.

Before writing, the free space of the folder is checked against the checkpoint's size (its
tensors' bytes plus the file format's overhead, or the previous file's size): a full disk is
a :class:`ResourceError` naming the folder and both byte counts, and the earlier checkpoints
stay intact. On reading, the payload is checked against what its use needs
(:data:`EXPORT_KEYS` to build the network, :data:`RESUME_KEYS` to continue training): a
missing key or a value of the wrong type is a :class:`RunError` naming the file and the key.
"""

from __future__ import annotations

import pickle
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from segcalib import __version__
from segcalib.errors import ResourceError, RunError
from segcalib.utils.files import atomic_path

FORMAT_VERSION = 1
BYTES_PER_TENSOR = 512  # the zip format's headers and alignment per stored tensor (measured ~360)
SIZE_MARGIN = 64 * 1024  # the pickled structure, config and RNG states


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (plus RNG states and versions) to ``path`` atomically."""
    payload = {
        **state,
        "format_version": FORMAT_VERSION,
        "segcalib_version": __version__,
        "torch_version": str(torch.__version__),
        "rng": rng_state(),
    }
    path = Path(path)
    check_free_space(path, checkpoint_bytes(payload, previous=path))
    with atomic_path(path, suffix=".pt") as tmp, open(tmp, "wb") as fh:
        torch.save(payload, fh)  # through a Python file: a full disk raises OSError(ENOSPC), not RuntimeError


def checkpoint_bytes(payload: dict[str, Any], previous: Path | None = None) -> int:
    """Bytes that ``payload`` will take on disk, rounded up: its tensors' storages (each counted
    once) plus the format's overhead, and at least the size of the ``previous`` file."""
    storages: dict[int, int] = {}

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            key = storage.data_ptr() or -len(storages) - 1  # views share a storage; empty ones do not
            storages[key] = storage.nbytes()
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(payload)
    estimate = sum(storages.values()) + BYTES_PER_TENSOR * len(storages) + SIZE_MARGIN
    if previous is not None and previous.is_file():
        estimate = max(estimate, previous.stat().st_size + SIZE_MARGIN)
    return estimate


def check_free_space(path: Path, needed: int) -> None:
    """:class:`ResourceError` when the folder of ``path`` has fewer than ``needed`` bytes free
    (the new file is written beside the old one, so the old one does not count as free)."""
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise ResourceError(
            f"{folder}: not enough free space to write {path.name}: {free:,} bytes free, about {needed:,} needed; "
            "the earlier checkpoints are intact. Free some space (or choose a run folder on another disk) "
            "and continue with --resume"
        )


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", purpose: str = "export"
) -> dict[str, Any]:
    """Load a checkpoint safely; a damaged file, one carrying code, or one lacking what
    ``purpose`` (``"export"``: build the network; ``"resume"``: continue training) needs is a
    clear error."""
    path = Path(path)
    if not path.exists():
        raise RunError(f"{path}: checkpoint does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise RunError(
            f"{path}: refused to load: the file holds objects other than tensors and plain data "
            f"(a checkpoint from elsewhere, or one carrying code): {_reason(exc)}"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise RunError(f"{path}: not a readable checkpoint (truncated or corrupt: {str(exc).splitlines()[0]})") from exc
    if not isinstance(payload, dict):
        raise RunError(f"{path}: not a segcalib checkpoint (a {type(payload).__name__}, not a mapping of states)")
    check_payload(payload, path, purpose)
    return payload


def checkpoint_epoch(path: str | Path) -> int:
    """The epoch recorded in a checkpoint, read without loading its tensors into memory."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RunError(f"{path}: not a readable checkpoint ({reason})") from exc
    if not isinstance(payload, dict):
        raise RunError(f"{path}: not a segcalib checkpoint")
    check_payload(payload, path, "export", {"epoch": EXPORT_KEYS["epoch"]})
    return int(payload["epoch"])


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors/plain data (loadable with weights_only)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": _plain(random.getstate()),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _reason(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported" in line or "global" in line.lower():
            return line.removeprefix("WeightsUnpickler error: ")
    return lines[0] if lines else type(exc).__name__


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


# -- what a payload must hold ------------------------------------------------------------------
# Each entry: key -> (a test of the value, what the value must be), or a nested schema.


def _is_int(low: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low), f"an integer >= {low}"


_NUMBER = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)), "a number"
_TEXT = (lambda v: isinstance(v, str)), "a string"
_TEXTS = (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)), "a list of strings"
_MAPPING = (lambda v: isinstance(v, dict)), "a mapping"
_OPTIONAL_MAPPING = (lambda v: v is None or isinstance(v, dict)), "a mapping or null"
_LIST = (lambda v: isinstance(v, list)), "a list"
_TENSOR = (lambda v: isinstance(v, torch.Tensor)), "a tensor"
_WEIGHTS = (
    (lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, torch.Tensor) for k, x in v.items())),
    "a mapping of parameter names to tensors",
)

EXPORT_KEYS: dict[str, Any] = {
    "model": _WEIGHTS,
    "epoch": _is_int(0),
    "num_classes": _is_int(1),
    "num_channels": _is_int(1),
    "class_names": _TEXTS,
    "config": _MAPPING,
    "config_hash": _TEXT,
}
"""What building the network for inference (export) reads from a checkpoint."""

RESUME_KEYS: dict[str, Any] = {
    **EXPORT_KEYS,
    "optimizer": {"state": _MAPPING, "param_groups": _LIST},
    "scheduler": _MAPPING,
    "scaler": _OPTIONAL_MAPPING,
    "loss": _MAPPING,
    "best_score": _NUMBER,
    "best_epoch": _is_int(0),
    "rng": {
        "python": _LIST,
        "numpy": {
            "kind": _TEXT, "keys": _TENSOR, "pos": _is_int(0), "has_gauss": _is_int(0), "cached_gaussian": _NUMBER,
        },
        "torch": _TENSOR,
    },
}
"""What continuing a training run (``--resume``) reads from ``last.pt``."""

_SCHEMAS = {"export": EXPORT_KEYS, "resume": RESUME_KEYS}


def check_payload(
    payload: dict[str, Any], path: str | Path, purpose: str, schema: dict[str, Any] | None = None
) -> None:
    """:class:`RunError` naming ``path`` and the (dotted) key that ``purpose`` needs but
    ``payload`` lacks or holds with the wrong type."""
    problem = _first_problem(payload, _SCHEMAS[purpose] if schema is None else schema, "")
    if problem is None and "class_names" in payload and "num_classes" in payload and schema is None:
        if len(payload["class_names"]) != payload["num_classes"]:
            names, classes = len(payload["class_names"]), payload["num_classes"]
            problem = f"'class_names' has {names} names but 'num_classes' is {classes}"
    if problem is not None:
        raise RunError(f"{path}: not a usable segcalib checkpoint for {purpose}: {problem}")


def _first_problem(value: dict[str, Any], schema: dict[str, Any], prefix: str) -> str | None:
    for key, rule in schema.items():
        name = f"{prefix}{key}"
        if key not in value:
            return f"key {name!r} is missing"
        item = value[key]
        if isinstance(rule, dict):
            if not isinstance(item, dict):
                return f"key {name!r} must be a mapping, got {_kind(item)}"
            problem = _first_problem(item, rule, f"{name}.")
            if problem is not None:
                return problem
        elif not rule[0](item):
            return f"key {name!r} must be {rule[1]}, got {_kind(item)}"
    return None


def _kind(value: Any) -> str:
    if isinstance(value, (bool, int, float)) or value is None:
        return f"{type(value).__name__} {value!r}"
    if isinstance(value, str):
        return f"str {value[:40]!r}"
    return type(value).__name__
