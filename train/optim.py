"""AdamW with weight-decay groups.

Decay applies to weight matrices and stacked experts (ndim >= 2) except embeddings;
norms, biases, router bias-like vectors and embeddings are not decayed, because
shrinking them toward zero changes what the model can represent rather than its
capacity.
"""

from __future__ import annotations

import torch
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
