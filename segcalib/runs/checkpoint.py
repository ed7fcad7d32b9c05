"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint holds only tensors and plain containers, so loading it never runs code from the
file: model, optimiser, scheduler and grad-scaler states, the loss state (CALS multipliers),
the epoch, the best score, the RNG states and the resolved config with its hash.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segcalib import __version__
from segcalib.errors import RunError
from segcalib.utils.files import atomic_path

FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (plus RNG states and versions) to ``path`` atomically."""
    payload = {
        **state,
        "format_version": FORMAT_VERSION,
        "segcalib_version": __version__,
        "torch_version": str(torch.__version__),
        "rng": rng_state(),
    }
    with atomic_path(path, suffix=".pt") as tmp, open(tmp, "wb") as fh:
        torch.save(payload, fh)  # through a Python file: a full disk raises OSError(ENOSPC), not RuntimeError


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely; a damaged file or one carrying code is a clear error."""
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
    if not isinstance(payload, dict) or "model" not in payload:
        raise RunError(f"{path}: not a segcalib checkpoint (no model state)")
    return payload


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
