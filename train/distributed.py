"""The process group of a run launched by torchrun (or anything that sets its variables).

One process per rank; RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT come from
the launcher. NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_device(device_type: str) -> torch.device:
    """This rank's device: cuda:LOCAL_RANK on GPUs, the CPU otherwise."""
    if device_type == "cuda":
        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(device_type)


@contextmanager
def process_group(device: torch.device):
    """Initialise the default process group when launched with WORLD_SIZE > 1, and destroy
    it afterwards (unless someone else had already initialised it)."""
    owned = world_size_from_env() > 1 and not dist.is_initialized()
    if owned:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=_device_id(device))
    try:
        yield
    except BaseException:
        if owned and dist.is_initialized():
            dist.destroy_process_group()
        raise
    if owned and dist.is_initialized():
        # After a normal end, wait for every rank: none tears its connections down while
        # another still finishes its last collective.
        dist.barrier()
        dist.destroy_process_group()


def _device_id(device: torch.device) -> torch.device | None:
    return device if device.type == "cuda" else None


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0
