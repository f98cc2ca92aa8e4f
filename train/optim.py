"""AdamW with weight-decay groups.

Decay applies to weight matrices and stacked experts (ndim >= 2) except embeddings;
norms, biases, router bias-like vectors and embeddings are not decayed, because
shrinking them toward zero changes what the model can represent rather than its
capacity.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsetron.train.config import OptimizerConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices and everything else, in a fixed order."""
    embedding_params = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)
    }
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim >= 2 and id(param) not in embedding_params:
            decay.append(param)
        else:
            no_decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


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


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """The global gradient norm (fp32), clipping to `max_norm` when it is positive."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    return torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
