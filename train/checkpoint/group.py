"""Process-group helpers of the checkpoint package: rank, world size and collectives that also run in one process."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def _barrier(group: dist.ProcessGroup | None) -> None:
    if _distributed():
        dist.barrier(group=group)


def _gather(group: dist.ProcessGroup | None, value: Any) -> list[Any]:
    """Every rank's `value`, by rank (one all_gather_object on `group`); [value] in one process."""
    if not _distributed():
        return [value]
    pooled: list[Any] = [None] * _world_size()
    dist.all_gather_object(pooled, value, group=group)
    return pooled


@contextmanager
def _single_process_dcp() -> Iterator[None]:
    # DCP warns on every call without a process group even when told no_dist=True.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# The same warning from the thread in which DCP's async_save writes, which no context of ours covers.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
