"""The process group of a run launched by torchrun (or anything that sets its variables).

One process per rank; RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT come from
the launcher. NCCL on GPUs, gloo on CPUs.

Restarts. torchrun (`--max-restarts`) starts a new generation of workers after one dies, and by
default its workers rendezvous in the agent's own key-value store, which outlives them: the
new generation finds the dead one's keys (gloo's and NCCL's connection addresses) and connects
to closed ports ("Connection refused") or waits for peers that never answer (pytorch issues
#135712, #167288). With one agent (one node), TORCHELASTIC_RESTART_COUNT names the generation,
so each one joins under its own key prefix here. With several agents the counts can differ
between nodes, so the launch scripts set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh store
per generation, hosted by its rank 0), and a launch that restarts without it is warned about.
"""

from __future__ import annotations

import datetime
import os
import sys
from contextlib import contextmanager

import torch
import torch.distributed as dist

SHARE_STORE_VAR = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
# Entries of torch's flight recorder (per process group): what the hang diagnosis reads.
FLIGHT_RECORDER_VAR = "TORCH_FR_BUFFER_SIZE"
FLIGHT_RECORDER_ENTRIES = "2000"


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_device(device_type: str) -> torch.device:
    """This rank's device: cuda:LOCAL_RANK on GPUs, the CPU otherwise."""
    if device_type == "cuda":
        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(device_type)


def shared_store_generation() -> str | None:
    """The key prefix that keeps this worker generation apart from earlier ones in torchrun's
    shared store, or None where none is needed (no restarts, or a fresh store per generation)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) == 0:
        return None
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1:
        if int(os.environ.get("RANK", "0")) == 0:
            print(
                f"warning: torchrun restarts workers into the store of the previous generation on several nodes, "
                f"where a restart can hang; launch with {SHARE_STORE_VAR}=1 (launch/slurm.sbatch does)",
                file=sys.stderr,
            )
        return None
    return f"sparsetron/generation_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _init(backend: str, timeout: datetime.timedelta, device: torch.device) -> None:
    os.environ.setdefault(FLIGHT_RECORDER_VAR, FLIGHT_RECORDER_ENTRIES)
    generation = shared_store_generation()
    if generation is None:
        dist.init_process_group(backend=backend, timeout=timeout, device_id=_device_id(device))
        return
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    dist.init_process_group(
        backend=backend,
        store=dist.PrefixStore(generation, store),
        rank=rank,
        world_size=world_size,
        timeout=timeout,
        device_id=_device_id(device),
    )


@contextmanager
def process_group(device: torch.device, init_timeout_s: float = 600.0):
    """Initialise the default process group when launched with WORLD_SIZE > 1, and destroy
    it afterwards (unless someone else had already initialised it). Every collective may wait
    `init_timeout_s` until `set_collective_timeout` says otherwise."""
    owned = world_size_from_env() > 1 and not dist.is_initialized()
    if owned:
        _init("nccl" if device.type == "cuda" else "gloo", datetime.timedelta(seconds=init_timeout_s), device)
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


def set_collective_timeout(seconds: float, skip: tuple = ()) -> None:
    """How long every later collective, on every process group of this process but those in
    `skip`, may wait.

    Groups made after the default one (the device mesh's) start with torch's own defaults
    (30 min for gloo, 10 for NCCL), not the default group's, hence all of them.
    """
    if not dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=seconds)
    for group in list(dist.distributed_c10d._world.pg_map):
        if group not in skip:
            dist.distributed_c10d._set_pg_timeout(timeout, group)


def _device_id(device: torch.device) -> torch.device | None:
    return device if device.type == "cuda" else None


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0
