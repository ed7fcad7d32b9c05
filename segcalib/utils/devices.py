"""Which device a command runs on: one rule for training, export and evaluation."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from segcalib.errors import ConfigError


def select_device(choice: str | torch.device | None = None, setting: str = "--device") -> torch.device:
    """``auto`` (or None): this process's GPU when there is one, else the CPU; ``cpu``; ``cuda``
    (this process's GPU: ``LOCAL_RANK`` under torchrun) or ``cuda:N``.

    A GPU asked for but absent, or a name that is not a device, is a :class:`ConfigError`
    naming ``setting`` (the option or config key it came from).
    """
    if choice is None or choice == "auto":
        return torch.device("cuda", _process_gpu()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(choice)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{setting}: {choice!r} is not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"{setting}: {choice!r}: segcalib runs on cpu or cuda")
    if not torch.cuda.is_available():
        raise ConfigError(f"{setting}: {choice} was asked for but no CUDA GPU is available")
    if device.index is None:
        return torch.device("cuda", _process_gpu())
    if device.index >= torch.cuda.device_count():
        raise ConfigError(f"{setting}: {choice}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def _process_gpu() -> int:
    """The GPU of this process: the current one inside a process group, else ``LOCAL_RANK``."""
    if dist.is_available() and dist.is_initialized():
        return torch.cuda.current_device()
    return int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AMX tiles or AVX512-BF16), where bf16
    autocast makes training faster instead of slower."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(bool(check()) for check in checks if check is not None)
