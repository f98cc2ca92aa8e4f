"""The memory plan against the device: refused before the model is materialized when it does not
fit (unless forced), and an out-of-memory error during training turned into one line.

What a rank may use: on CUDA the device's free memory (`torch.cuda.mem_get_info`); on a CPU the
node's available memory (MemAvailable of /proc/meminfo) shared by the ranks of the node
(LOCAL_WORLD_SIZE). The plan (parallel/memory.py) counts parameters, gradients and AdamW states
exactly and activations as an estimate, without the allocator's own overhead, so a plan that
exceeds the device fails for certain and one slightly below it may still run out of memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsetron.model.config import ConfigError
from sparsetron.parallel.memory import MemoryPlan, format_bytes

MEMINFO = Path("/proc/meminfo")
REMEDY = (
    "reduce it with trainer.micro_batch_size, parallel.activation_checkpointing=full or data.seq_len "
    "(activations), or spread it over more ranks with parallel.data_parallel_shard, parallel.tensor, "
    "parallel.pipeline, parallel.expert or parallel.context"
)
CPU_OUT_OF_MEMORY = "DefaultCPUAllocator: can't allocate memory"


class OutOfMemory(RuntimeError):
    """A step (or evaluation) ran out of device memory; the message names the plan and the knobs."""


@dataclass(frozen=True)
class DeviceMemory:
    """The memory one rank may use, and how it was measured (for the message)."""

    available: int
    total: int
    source: str


def _meminfo_bytes(name: str) -> int | None:
    try:
        for line in MEMINFO.read_text().splitlines():
            key, _, value = line.partition(":")
            if key == name:
                return int(value.split()[0]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def device_memory(device: torch.device) -> DeviceMemory | None:
    """What this rank may use on `device` now; None where it cannot be measured."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return DeviceMemory(free, total, f"{device} has {format_bytes(free)} free of {format_bytes(total)}")
    if device.type != "cpu":
        return None
    available, total = _meminfo_bytes("MemAvailable"), _meminfo_bytes("MemTotal")
    if available is None or total is None:
        return None
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    source = f"this node has {format_bytes(available)} available of {format_bytes(total)} (MemAvailable)"
    if ranks > 1:
        source += f", {format_bytes(available // ranks)} for each of its {ranks} ranks"
    return DeviceMemory(available // ranks, total // ranks, source)


def check_plan_fits(plan: MemoryPlan, device: torch.device, force: bool) -> str | None:
    """None when the plan fits the device (or the device cannot be measured); when it does not,
    a warning to print if `force`, else ConfigError."""
    memory = device_memory(device)
    if memory is None or plan.total_bytes <= memory.available:
        return None
    message = f"{plan.describe()}; more than {memory.source}: {REMEDY}"
    if force:
        return f"{message} (starting anyway: --force)"
    raise ConfigError(f"{message}; or start anyway with `sparsetron train --force`")


def is_out_of_memory(err: BaseException) -> bool:
    """torch's CUDA (or other accelerator) out-of-memory error, or the CPU allocator's."""
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(err, RuntimeError) and CPU_OUT_OF_MEMORY in str(err)
    )


def out_of_memory(err: BaseException, plan: MemoryPlan, device: torch.device, step: int) -> OutOfMemory:
    """The one-line error for `err` (see is_out_of_memory), raised in the step after `step`."""
    # torch's first two sentences: what ran out and how much was asked for.
    cause = ". ".join(str(err).strip().split("\n")[0].split(". ")[:2]).rstrip(".") or type(err).__name__
    return OutOfMemory(f"out of memory on {device} in step {step + 1} ({cause}); {plan.describe()}: {REMEDY}")
