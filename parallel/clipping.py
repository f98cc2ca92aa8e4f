"""Gradient clipping by the norm of the whole model, whatever its layout."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


def clip_grad_norm(model: nn.Module, max_norm: float, pipeline_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The global gradient norm (fp32), clipping to `max_norm` when it is positive.

    Gradients may be DTensors on different meshes (dense parameters over the data and tensor
    ranks, routed experts over the expert ranks), which one norm call cannot mix: each mesh's
    norm is taken whole (`full_tensor`) and the squares are added. A plain gradient is the same
    on every rank that holds it, so it counts once. Under pipeline parallelism each stage holds
    other parameters: the squares are summed over `pipeline_group` too, so every rank clips by
    the norm of the whole model.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    by_mesh: dict[object, list[torch.Tensor]] = {}
    for param in params:
        by_mesh.setdefault(param.grad.device_mesh if isinstance(param.grad, DTensor) else None, []).append(param)
    squares = []
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], foreach=True)
        squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).float().square())
    device = params[0].grad.device if params else torch.device("cpu")
    total_sq = torch.stack(squares).sum() if squares else torch.zeros((), device=device)
    if pipeline_group is not None:
        dist.all_reduce(total_sq, group=pipeline_group)
    total = total_sq.sqrt()
    if max_norm > 0 and params:
        for group in by_mesh.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach=True)
    return total
