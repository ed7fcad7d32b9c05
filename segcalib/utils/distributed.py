"""torch.distributed helpers that are no-ops in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a process group is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes in place (and return it); identity in one process.

    The gloo backend cannot reduce CUDA tensors and NCCL cannot reduce CPU tensors, so the
    tensor travels to the backend's device and back when they differ.
    """
    if not is_distributed():
        return tensor
    backend = dist.get_backend()
    wants_cuda = backend == "nccl"
    if wants_cuda == tensor.is_cuda:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor
    device = torch.device("cuda", torch.cuda.current_device()) if wants_cuda else torch.device("cpu")
    moved = tensor.to(device)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    tensor.copy_(moved)
    return tensor


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init_from_env() -> bool:
    """Join the process group that ``torchrun`` describes in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, ...); NCCL when each process has a GPU, gloo otherwise. Returns True if joined."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() > int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_objects(obj: object) -> list:
    """Every process's ``obj`` in rank order (``[obj]`` in one process); JSON-like objects only."""
    if not is_distributed():
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
