"""model.sigma_reparam on a parallelized model: the power iteration works on whole matrices.

Tensor parallelism splits a linear's weight by rows or columns, expert parallelism splits the
stacked experts, FSDP shards every parameter over the data ranks; sigma must be the spectral
norm of the global matrix, the same on every rank. So the walk of model/sigma_reparam.py is
handed `whole` (a DTensor's global value, an all-gather) and `store_whole` (each rank keeps its
own part of the new global value, as parallel/init.py does): every rank computes the same u, v
and gamma from the same global matrices, in the same order, bitwise what one process computes.

Cost: each step gathers every reparametrized matrix once more (outside the forward, one matrix
at a time), as much traffic as one more FSDP forward gather; u and v are vectors, so the
iteration itself is a few matrix-vector products per matrix. Layer by layer the gathers are
collectives over the weight's own mesh, so every rank of it walks the same modules (all ranks
of a pipeline stage hold the same ones).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from sparsetron.model import sigma_reparam


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The global value of `tensor` (a DTensor's all-gather; a plain tensor as it is)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def store_whole(target: torch.Tensor, value: torch.Tensor) -> None:
    """Write the global `value` into `target`, a rank keeping its own part of a DTensor."""
    if isinstance(target, DTensor):
        # src_data_rank=None: every rank holds `value` already, so this only slices.
        part = distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None)
        target.to_local().copy_(part.to_local())
    else:
        target.copy_(value)


@torch.no_grad()
def power_iteration_step(model: nn.Module) -> None:
    """One power-iteration step of every reparametrized matrix; once per training step, first."""
    sigma_reparam.power_iteration_step(model, gather=whole, store=store_whole)


@torch.no_grad()
def init_sigma_reparam(model: nn.Module) -> None:
    """gamma = sigma(W) and converged u, v for this rank's part of the model, after `init_weights`."""
    sigma_reparam.init_sigma_reparam(model, gather=whole, store=store_whole)
