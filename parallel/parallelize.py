"""Apply the parallel layout to a plain model, in one fixed order.

Order: activation checkpointing, compile, then data-parallel sharding (FSDP2/HSDP), so
that each compiled, checkpointed block is one FSDP unit. The model is still on the meta
device here; the caller materialises it afterwards (`to_empty`, then `init_weights` under
`parallel.init.SingleProcessInit`).

Implemented axes: data_parallel_replicate and data_parallel_shard. Tensor, context,
pipeline and expert parallelism are refused by name in `check_supported`, before any
process group exists.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from sparsetron.model.config import ConfigError
from sparsetron.model.moe.balancing import moe_layers
from sparsetron.parallel.activation_checkpoint import apply_ac
from sparsetron.parallel.compile import apply_compile
from sparsetron.parallel.config import ParallelConfig
from sparsetron.parallel.dims import ParallelDims, ParallelMesh
from sparsetron.parallel.fsdp import apply_fsdp

NOT_YET = {"tp": "tensor", "cp": "context", "pp": "pipeline", "ep": "expert"}


def check_supported(dims: ParallelDims) -> None:
    """Refuse the axes this version cannot apply yet, naming the key."""
    for field, key in NOT_YET.items():
        degree = getattr(dims, field)
        if degree != 1:
            raise ConfigError(
                f"parallel.{key}={degree}: {key} parallelism is not implemented yet; "
                "data parallelism (data_parallel_shard, data_parallel_replicate) is"
            )


def sum_over(group: dist.ProcessGroup):
    """A function that sums a tensor over `group` and returns it (for MoE load counts)."""

    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
        return tensor

    return reduce


def parallelize(model: nn.Module, cfg: ParallelConfig, dims: ParallelDims, mesh: ParallelMesh | None) -> nn.Module:
    """Apply activation checkpointing, compile and data parallelism as `cfg` and `dims` ask."""
    if cfg.activation_checkpointing == "full":
        apply_ac(model)
    if cfg.compile:
        apply_compile(model)
    if mesh is not None and dims.dp_enabled:
        # The global auxiliary loss counts expert assignments over every data-parallel rank.
        for layer in moe_layers(model):
            layer.count_reducer = sum_over(mesh.group("dp_cp"))
        shard_mesh = mesh["dp_replicate", "dp_shard_cp"] if dims.dp_replicate_enabled else mesh["dp_shard_cp"]
        apply_fsdp(model, shard_mesh)
    return model
