"""Apply the parallel layout to a plain model, in one fixed order.

    pipeline split -> tensor + sequence parallel -> expert parallel -> MoE reducers
    -> activation checkpointing -> compile -> FSDP2 / HSDP

The pipeline split comes first because every later step works on the pieces this rank
holds (`parallel.pipeline`); the trainer does it and passes each piece here. Tensor and
expert parallelism turn weights into DTensors on their meshes and must see the plain
modules, before activation checkpointing and compile wrap them. FSDP comes last so that each
compiled, checkpointed block is one FSDP unit, with the expert weights a nested unit on
their own (expert-data-parallel) ranks. The model is still on the meta device here; the
caller materialises it afterwards (`to_empty`, then `init_weights` under
`parallel.init.SingleProcessInit`).

Context parallelism is refused by name in `check_supported`, before any process group exists.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsetron.model.config import ConfigError
from sparsetron.model.moe.balancing import moe_layers
from sparsetron.parallel.activation_checkpoint import apply_ac
from sparsetron.parallel.collectives import sum_over
from sparsetron.parallel.compile import apply_compile
from sparsetron.parallel.config import ParallelConfig
from sparsetron.parallel.dims import ParallelDims, ParallelMesh
from sparsetron.parallel.expert_parallel import apply_ep
from sparsetron.parallel.fsdp import apply_fsdp
from sparsetron.parallel.tensor_parallel import apply_tp, check_tp


def check_supported(dims: ParallelDims, seq_len: int) -> None:
    """Refuse, before any process group exists, what this version cannot apply."""
    if dims.cp_enabled:
        raise ConfigError(
            f"parallel.context={dims.cp}: context parallelism is not implemented yet; data, tensor, "
            "expert and pipeline parallelism are"
        )
    check_tp(dims.tp, seq_len)


def parallelize(
    model: nn.Module,
    cfg: ParallelConfig,
    dims: ParallelDims,
    mesh: ParallelMesh | None,
    param_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Apply tensor, expert and data parallelism, activation checkpointing and compile as `cfg`
    and `dims` ask, in the module docstring's order. `model` is this rank's (pipeline) piece;
    `param_dtype` is FSDP's compute dtype for parameters (bf16 under mixed precision)."""
    if mesh is not None:
        if dims.tp_enabled:
            apply_tp(model, mesh["tp"])
        if dims.ep_enabled:
            apply_ep(model, mesh)
        if dims.dp_cp * dims.tp > 1:
            # The global auxiliary loss counts expert assignments over every rank holding other tokens.
            reducer = sum_over(mesh.group("dp_cp_tp"))
            for layer in moe_layers(model):
                layer.count_reducer = reducer
    if cfg.activation_checkpointing == "full":
        apply_ac(model)
    if cfg.compile:
        apply_compile(model)
    if mesh is not None and dims.dp_enabled:
        apply_fsdp(model, mesh, param_dtype)
    return model
