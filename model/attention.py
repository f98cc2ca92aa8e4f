"""Grouped-query self-attention with rotary positions: q, k, v, then one attention op.

The op is chosen once from the config (`model.attention_ops.attention_op`): full causal
attention (over packed documents when the batch has them), or MoBA
(../shared/specs/moba.md) when attention.backend is moba and the layer is not one of the
hybrid full-attention layers. A MoBA layer runs full attention instead while its
`full_attention` flag is on; the trainer sets that flag from the step (`set_full_attention`,
attention.moba_full_after).

Shape legend: B batch, S sequence, D model dim, H query heads, K key/value heads, d head dim.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsetron.model.attention_ops import attention_op, full_attention
from sparsetron.model.config import AttentionConfig, ModelConfig
from sparsetron.model.layers import RMSNorm, apply_rope, rope_tables
from sparsetron.model.sequence import SequenceInfo
from sparsetron.model.sigma_reparam import linear


def set_full_attention(model: nn.Module, full: bool) -> int:
    """Make every MoBA layer of `model` run full attention (SDPA) or MoBA again; returns how many
    MoBA layers it holds. Layers that always use full attention are left alone."""
    layers = [m for m in model.modules() if isinstance(m, Attention) and m.moba]
    for attention in layers:
        attention.full_attention = full
    return len(layers)


class Attention(nn.Module):
    """Multi-head attention with H query heads sharing K key/value heads (H % K == 0)."""

    def __init__(self, dim: int, attn_cfg: AttentionConfig, model_cfg: ModelConfig, layer_id: int = 0):
        super().__init__()
        self.op = attention_op(attn_cfg, layer_id, model_cfg.n_layers)
        """The attention op this layer was built with (see model.attention_ops)."""
        self.full_op = full_attention
        """The op while `full_attention` is set (context parallelism wraps both)."""
        self.moba = attn_cfg.uses_moba(layer_id, model_cfg.n_layers)
        """This layer runs MoBA (backend moba, not a hybrid full-attention layer)."""
        self.full_attention = False
        """Run full attention even though `moba` is set (the end of training, see `set_full_attention`)."""
        self.entropy_probe = None
        """At a step that logs attention entropy, what records it (model.attention_entropy.EntropyProbe)."""
        self.n_heads = attn_cfg.n_heads
        self.n_kv_heads = attn_cfg.kv_heads()
        self.head_dim = attn_cfg.head_size(dim)
        self.rope_theta = attn_cfg.rope_theta
        self.max_seq_len = model_cfg.max_seq_len
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")

        bias, reparam = attn_cfg.qkv_bias, model_cfg.sigma_reparam
        self.wq = linear(dim, self.n_heads * self.head_dim, bias, reparam)
        self.wk = linear(dim, self.n_kv_heads * self.head_dim, bias, reparam)
        self.wv = linear(dim, self.n_kv_heads * self.head_dim, bias, reparam)
        self.wo = linear(self.n_heads * self.head_dim, dim, False, reparam)
        self.q_norm = RMSNorm(self.head_dim, model_cfg.norm_eps) if attn_cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, model_cfg.norm_eps) if attn_cfg.qk_norm else None

        # Non-persistent: derived from the config, so checkpoints need not carry them.
        cos, sin = rope_tables(self.head_dim, self.max_seq_len, self.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x_BSD: torch.Tensor, seq: SequenceInfo) -> torch.Tensor:
        """x [B, S, D] -> [B, S, D]; `seq` describes the batch's whole sequences (positions, documents)."""
        B, S, _ = x_BSD.shape
        q_BSHd = self.wq(x_BSD).view(B, S, self.n_heads, self.head_dim)
        k_BSKd = self.wk(x_BSD).view(B, S, self.n_kv_heads, self.head_dim)
        v_BSKd = self.wv(x_BSD).view(B, S, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q_BSHd = self.q_norm(q_BSHd)
            k_BSKd = self.k_norm(k_BSKd)
        q_BSHd = apply_rope(q_BSHd, self.rope_cos, self.rope_sin, seq.positions_BS)
        k_BSKd = apply_rope(k_BSKd, self.rope_cos, self.rope_sin, seq.positions_BS)
        op = self.op if self.runs_moba else self.full_op
        if self.entropy_probe is not None:
            self.entropy_probe.record(q_BSHd, k_BSKd, seq, (op.block_size, op.topk) if self.runs_moba else None)
        o_BSHd = op(q_BSHd, k_BSKd, v_BSKd, seq)
        return self.wo(o_BSHd.reshape(B, S, self.n_heads * self.head_dim))

    @property
    def runs_moba(self) -> bool:
        """Whether the next forward runs MoBA (else SDPA)."""
        return self.moba and not self.full_attention

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        for projection in (self.wq, self.wk, self.wv):
            nn.init.normal_(projection.weight, std=std)
            if projection.bias is not None:
                nn.init.zeros_(projection.bias)
        # wo writes into the residual stream; see FeedForward.init_weights.
        nn.init.normal_(self.wo.weight, std=out_std)
        if self.q_norm is not None:
            self.q_norm.init_weights()
            self.k_norm.init_weights()
        self.reset_rope()

    @torch.no_grad()
    def reset_rope(self) -> None:
        """Recompute the rotary tables in place (after `to_empty` they hold garbage)."""
        cos, sin = rope_tables(self.head_dim, self.max_seq_len, self.rope_theta, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
