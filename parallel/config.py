"""The `parallel` section: the device-mesh layout and the per-model wrappers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sparsetron.model.config import check

PIPELINE_SCHEDULES = ("1f1b", "interleaved_1f1b", "zero_bubble")
CONTEXT_STYLES = ("allgather", "ulysses")

AXES = ("data_parallel_replicate", "data_parallel_shard", "context", "tensor", "pipeline", "expert")


@dataclass
class ParallelConfig:
    """Degrees of each mesh axis, activation checkpointing and compilation."""

    data_parallel_replicate: int = 1
    """Replicas of the data-parallel group (HSDP's outer axis)."""
    data_parallel_shard: int = 1
    """Ranks the parameters are sharded over (FSDP2); -1 = whatever the other degrees leave of the world size."""
    context: int = 1
    """Ranks every sequence is split over (context parallelism), each holding two chunks of it (head and tail)."""
    context_style: Literal["allgather", "ulysses"] = "allgather"
    """How attention sees the other context ranks' positions: allgather (queries stay, keys and values are
    all-gathered; any context degree, the cheaper with few key/value heads) or ulysses (an all-to-all exchanges
    positions for heads around the unchanged attention op; needs tensor x context to divide the head counts)."""
    tensor: int = 1
    """Ranks each matrix is split over (tensor + sequence parallelism)."""
    pipeline: int = 1
    """Ranks the transformer's layers are split over, one after another (pipeline parallelism)."""
    expert: int = 1
    """Ranks the routed experts are split over, folded onto the data and context ranks."""
    activation_checkpointing: Literal["none", "full"] = "none"
    """Recompute each transformer block in the backward instead of keeping its activations."""
    compile: bool = False
    """Compile each transformer block with torch.compile."""
    pipeline_schedule: Literal["1f1b", "interleaved_1f1b", "zero_bubble"] = "1f1b"
    """Order of forwards and backwards over a step's micro-batches (trainer.grad_accum_steps of them) when
    pipeline > 1: 1f1b (one stage per rank, needs grad_accum_steps >= pipeline); interleaved_1f1b (Megatron's
    virtual stages, looped over the ranks); zero_bubble (torch's ScheduleZBVZeroBubble: two stages per rank in a
    V, backward split into input and weight gradients to fill the bubble; refuses compile)."""
    pipeline_stages_per_rank: int = 0
    """Stages (virtual pipeline stages) each pipeline rank runs. 0 = the schedule's own: 1 for 1f1b, 2 for
    interleaved_1f1b and zero_bubble; interleaved_1f1b takes any number >= 2, zero_bubble only 2."""
    init_timeout_s: float = 600.0
    """Seconds any one collective may wait at start-up (joining the process group, building the mesh, loading a
    checkpoint) and while saving one. A rank that does not arrive in time fails the job with an error naming it."""
    step_timeout_s: float = 300.0
    """Seconds any one collective of a training step or an evaluation may wait for the other ranks; past it the
    job fails (under torchrun --max-restarts it restarts from the last checkpoint) with an error naming the
    collective and the rank(s) that did not reach it, instead of waiting forever."""

    def validate(self, prefix: str = "parallel") -> None:
        for axis in AXES:
            value = getattr(self, axis)
            fills_the_rest = axis == "data_parallel_shard" and value == -1
            check(value >= 1 or fills_the_rest, f"{prefix}.{axis}", f"must be a positive integer, got {value}")
        check(
            self.pipeline_schedule in PIPELINE_SCHEDULES,
            f"{prefix}.pipeline_schedule",
            f"must be one of {', '.join(PIPELINE_SCHEDULES)}, got {self.pipeline_schedule!r}",
        )
        check(
            self.context_style in CONTEXT_STYLES,
            f"{prefix}.context_style",
            f"must be one of {', '.join(CONTEXT_STYLES)}, got {self.context_style!r}",
        )
        for key in ("init_timeout_s", "step_timeout_s"):
            value = getattr(self, key)
            check(value > 0, f"{prefix}.{key}", f"must be a positive number of seconds, got {value}")
        n = self.stages_per_rank()
        if self.pipeline_schedule == "1f1b":
            check(n == 1, f"{prefix}.pipeline_stages_per_rank", f"1f1b runs one stage per rank, got {n}")
        elif self.pipeline_schedule == "zero_bubble":
            check(n == 2, f"{prefix}.pipeline_stages_per_rank", f"zero_bubble (ZBV) runs two stages per rank, got {n}")
        else:
            check(n >= 2, f"{prefix}.pipeline_stages_per_rank", f"interleaved_1f1b needs >= 2 stages per rank, got {n}")

    def stages_per_rank(self) -> int:
        """`pipeline_stages_per_rank`, with 0 resolved to the schedule's own number."""
        if self.pipeline_stages_per_rank:
            return self.pipeline_stages_per_rank
        return 1 if self.pipeline_schedule == "1f1b" else 2
