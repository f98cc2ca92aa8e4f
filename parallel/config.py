"""The `parallel` section: the device-mesh layout and the per-model wrappers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sparsetron.model.config import check

AXES = ("data_parallel_replicate", "data_parallel_shard", "context", "tensor", "pipeline", "expert")


@dataclass
class ParallelConfig:
    """Degrees of each mesh axis, activation checkpointing and compilation."""

    data_parallel_replicate: int = 1
    """Replicas of the data-parallel group (HSDP's outer axis)."""
    data_parallel_shard: int = 1
    """Ranks the parameters are sharded over (FSDP2); -1 = whatever the other degrees leave of the world size."""
    context: int = 1
    """Ranks the sequence is split over for attention (context parallelism)."""
    tensor: int = 1
    """Ranks each matrix is split over (tensor + sequence parallelism)."""
    pipeline: int = 1
    """Pipeline stages."""
    expert: int = 1
    """Ranks the routed experts are split over, folded onto the data and context ranks."""
    activation_checkpointing: Literal["none", "full"] = "none"
    """Recompute each transformer block in the backward instead of keeping its activations."""
    compile: bool = False
    """Compile each transformer block with torch.compile."""

    def validate(self, prefix: str = "parallel") -> None:
        for axis in AXES:
            value = getattr(self, axis)
            fills_the_rest = axis == "data_parallel_shard" and value == -1
            check(value >= 1 or fills_the_rest, f"{prefix}.{axis}", f"must be a positive integer, got {value}")
