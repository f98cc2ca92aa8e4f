"""One transformer block: pre-norm attention, then a dense SwiGLU FFN or a MoE layer.

Shape legend: B batch, S sequence, D model dim.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsetron.model.attention import Attention
from sparsetron.model.config import AttentionConfig, ModelConfig, MoEConfig
from sparsetron.model.layers import FeedForward, RMSNorm
from sparsetron.model.moe.layer import MoE
from sparsetron.model.sequence import SequenceInfo


def uses_moe(layer_id: int, moe_cfg: MoEConfig | None) -> bool:
    """Whether block `layer_id` has a MoE layer rather than a dense FFN."""
    return moe_cfg is not None and moe_cfg.enabled and layer_id >= moe_cfg.first_k_dense


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then h + ffn(norm(h)); a MoE FFN routes on
    norm(h), or on attention's input norm(x) with moe.router_input=pre_attention."""

    def __init__(
        self, layer_id: int, model_cfg: ModelConfig, attn_cfg: AttentionConfig, moe_cfg: MoEConfig | None = None
    ):
        super().__init__()
        self.layer_id = layer_id
        self.is_moe = uses_moe(layer_id, moe_cfg)
        self.routes_before_attention = self.is_moe and moe_cfg.router_input == "pre_attention"
        self.attention_norm = RMSNorm(model_cfg.dim, model_cfg.norm_eps)
        self.attention = Attention(model_cfg.dim, attn_cfg, model_cfg, layer_id)
        self.ffn_norm = RMSNorm(model_cfg.dim, model_cfg.norm_eps)
        if self.is_moe:
            self.feed_forward = MoE(model_cfg.dim, model_cfg, moe_cfg)
        else:
            self.feed_forward = FeedForward(model_cfg.dim, model_cfg.ffn_hidden, model_cfg.sigma_reparam)

    def forward(self, x_BSD: torch.Tensor, seq: SequenceInfo) -> torch.Tensor:
        a_BSD = self.attention_norm(x_BSD)
        h_BSD = x_BSD + self.attention(a_BSD, seq)
        if self.routes_before_attention:
            # moe.router_input=pre_attention: the router reads what attention read.
            return h_BSD + self.feed_forward(self.ffn_norm(h_BSD), a_BSD)
        return h_BSD + self.feed_forward(self.ffn_norm(h_BSD))

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        self.attention_norm.init_weights()
        self.attention.init_weights(std, out_std)
        self.ffn_norm.init_weights()
        self.feed_forward.init_weights(std, out_std)
