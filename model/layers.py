"""Building blocks shared by the transformer: RMSNorm, the SwiGLU FFN, rotary positions, and
`AttachLoss`, which adds a side loss to the backward.

Shape legend: B batch, S sequence, D model dim, H heads, d head dim, F FFN hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsetron.model.computed import as_computed
from sparsetron.model.sigma_reparam import linear

__all__ = ["FeedForward", "RMSNorm", "apply_rope", "as_computed", "rope_tables"]


class AttachLoss(torch.autograd.Function):
    """`AttachLoss.apply(y, loss, scale)` returns y unchanged; in backward, gives `loss` the gradient `scale`.

    This puts a side loss (MoE balancing losses, multi-token prediction) into the backward pass
    without changing what forward returns, so no caller (step runner, pipeline schedule,
    evaluation) has to collect and add it.
    """

    @staticmethod
    def forward(ctx, y, loss, scale):
        ctx.loss_dtype, ctx.loss_device, ctx.scale = loss.dtype, loss.device, scale
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return grad_y, torch.full((), ctx.scale, dtype=ctx.loss_dtype, device=ctx.loss_device), None


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 whatever the input dtype (the weight rounded to the
    autocast dtype first under autocast: see `as_computed`)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        # bf16 squares lose too many bits for the mean; fp32 (or wider) keeps the norm stable.
        compute = torch.promote_types(x_BSD.dtype, torch.float32)
        x = x_BSD.to(compute)
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * as_computed(self.weight).to(compute)).to(x_BSD.dtype)

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int, sigma_reparam: bool = False):
        super().__init__()
        self.w1 = linear(dim, hidden, sigma_reparam=sigma_reparam)
        self.w3 = linear(dim, hidden, sigma_reparam=sigma_reparam)
        self.w2 = linear(hidden, dim, sigma_reparam=sigma_reparam)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x_BSD)) * self.w3(x_BSD))

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w1.weight, std=std)
        nn.init.normal_(self.w3.weight, std=std)
        # w2 writes into the residual stream; the smaller std keeps its variance from growing with depth.
        nn.init.normal_(self.w2.weight, std=out_std)


def rope_tables(
    head_dim: int, max_seq_len: int, theta: float, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each [max_seq_len, head_dim // 2], fp32.

    Frequency i rotates the pair (x[i], x[i + d/2]) (the Llama / Hugging Face half-split
    layout), so only half the columns need storing. Angles are formed in fp64: at position
    100k an fp32 product is already off by ~5e-3 rad.
    """
    if head_dim % 2:
        raise ValueError(f"rotary head_dim must be even, got {head_dim}")
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    angles_Sh = torch.outer(torch.arange(max_seq_len, dtype=torch.float64, device=device), inv_freq)
    return angles_Sh.cos().float(), angles_Sh.sin().float()


def apply_rope(x_BSHd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions_BS: torch.Tensor) -> torch.Tensor:
    """Rotate every head of x by the angles of its token's position.

    x_BSHd: [B, S, H, d]; cos, sin: [max_seq_len, d/2] from `rope_tables`;
    positions_BS: integer positions, [B, S] (or [S], shared by every row).
    Computed in fp32 (fp64 stays fp64), returned in x's dtype.
    """
    half = x_BSHd.shape[-1] // 2
    x = x_BSHd.to(torch.promote_types(x_BSHd.dtype, torch.float32))
    # Gather per token, then add a head axis so every head gets the same rotation.
    cos_BS1h = cos[positions_BS].unsqueeze(-2).to(x.dtype)
    sin_BS1h = sin[positions_BS].unsqueeze(-2).to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.cat((x1 * cos_BS1h - x2 * sin_BS1h, x2 * cos_BS1h + x1 * sin_BS1h), dim=-1)
    return out.to(x_BSHd.dtype)
