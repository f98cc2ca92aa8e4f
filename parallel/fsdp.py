"""Data parallelism: FSDP2 (`fully_shard`) per transformer block and at the root.

A 1-D mesh shards parameters (FSDP); a 2-D (replicate, shard) mesh is HSDP: parameters
sharded within a group and replicated across groups, gradients reduced over both.
Gradients are averaged over the mesh, which with a per-rank mean loss over equal token
counts gives the gradient of the global mean loss.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard


def apply_fsdp(model: nn.Module, mesh: DeviceMesh) -> None:
    """Shard every block of `model.layers`, then the rest (embeddings, final norm, head) at the root."""
    for block in model.layers.values():
        if block is not None:
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
