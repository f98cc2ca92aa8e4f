"""AdamW with weight-decay groups.

Decay applies to weight matrices and stacked experts (ndim >= 2) except embeddings;
norms, biases, router bias-like vectors and embeddings are not decayed, because
shrinking them toward zero changes what the model can represent rather than its
capacity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from sparsetron.train.config import OptimizerConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups in a fixed order: decayed matrices, then everything else.

    Each kind is split further by where its parameters live (plain tensors, DTensors of one
    mesh, of another): torch's multi-tensor (foreach) update cannot mix them in one call, and
    a parallel layout mixes them (e.g. MoE weights stay plain under tensor parallelism).
    """
    embedding_params = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)
    }
    groups: dict[tuple[bool, object], list[nn.Parameter]] = {}
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = param.ndim >= 2 and id(param) not in embedding_params
        mesh = param.device_mesh if isinstance(param, DTensor) else None
        groups.setdefault((decay, mesh), []).append(param)
    ordered = sorted(groups.items(), key=lambda item: not item[0][0])  # stable: decayed groups first
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0} for (decay, _), params in ordered]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW over `model`; the fused implementation on GPUs, the loop-free foreach one elsewhere."""
    on_cuda = any(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
        fused=on_cuda or None,
        foreach=None if on_cuda else True,
    )


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
