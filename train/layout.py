"""A job's parallel layout and its per-rank memory plan, as `train` resolves them and `plan` reports them.

Both run before any tensor is allocated: the layout from the config and the world size alone,
the memory plan from the model parallelized on the meta device.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsetron.kernels.varlen import flash_varlen_available
from sparsetron.parallel.dims import ParallelDims
from sparsetron.parallel.memory import AttentionPaths, MemoryPlan, memory_plan
from sparsetron.parallel.parallelize import check_supported
from sparsetron.parallel.precision import Precision
from sparsetron.train.config import JobConfig
from sparsetron.train.global_batch import accumulation_key, resolve_global_batch


def resolve_layout(job: JobConfig, world_size: int) -> ParallelDims:
    """The layout `job` asks for on `world_size` ranks, with every check that needs no process
    group (degrees, heads, experts, sequence splits, pipeline schedule); errors name the key.

    Resolves the global batch for the layout in place (train/global_batch.py): afterwards
    trainer.grad_accum_steps and trainer.global_batch_size hold what this layout trains."""
    dims = ParallelDims.from_config(job.parallel, world_size)
    dims.validate(job.attention.n_heads, job.attention.kv_heads(), job.moe.routed_experts)
    tc = job.trainer
    from_global_batch = tc.global_batch_size != 0
    resolve_global_batch(tc, dims.dp)
    accum_key = accumulation_key(tc, dims.dp, from_global_batch=from_global_batch)
    check_supported(job.parallel, dims, job.model, job.attention, job.data.seq_len, tc.grad_accum_steps, accum_key)
    return dims


def rank_memory_plan(
    model: nn.Module, job: JobConfig, dims: ParallelDims, precision: Precision, device: torch.device
) -> MemoryPlan:
    """The memory plan of this rank's `model` (parallelized, still on the meta device) as `job`
    trains it on `device`."""
    return memory_plan(
        model,
        job.model,
        job.attention,
        job.moe,
        dims,
        job.trainer.micro_batch_size,
        job.data.seq_len,
        precision.activation_dtype.itemsize,
        job.parallel.activation_checkpointing == "full",
        # The first stage of a pipeline keeps up to one micro-batch per stage in flight.
        min(job.trainer.grad_accum_steps, dims.pp),
        paths=AttentionPaths(
            flash=flash_varlen_available(device.type, precision.activation_dtype),
            moba_kernels=device.type == "cuda",  # kernels.moba.moba_attention's own switch
            cp_style=job.parallel.context_style,
        ),
    )
