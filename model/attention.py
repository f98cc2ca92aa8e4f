"""Grouped-query self-attention with rotary positions and document masking, through SDPA or MoBA.

A layer runs MoBA (`sparsetron.kernels.moba`, ../shared/specs/moba.md) when attention.backend
is moba and the layer is not one of the hybrid full-attention layers, and its `full_attention`
flag is off; the trainer sets that flag from the step (`set_full_attention`, attention.moba_full_after).
MoBA reads the batch as packed sequences: each row is one sequence, or, with document
masking, each document is (`sequence_bounds`).

Shape legend: B batch, S sequence, D model dim, H query heads, K key/value heads, d head dim,
T = B * S packed tokens, N + 1 sequence boundaries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsetron.kernels.moba import moba_attention
from sparsetron.model.config import AttentionConfig, ModelConfig
from sparsetron.model.layers import RMSNorm, apply_rope, rope_tables


def sequence_bounds(doc_ids_BS: torch.Tensor | None, B: int, S: int, device: torch.device) -> torch.Tensor:
    """cu_seqlens [N + 1] int32 of the batch read as packed sequences (FlashAttention's varlen layout).

    Without doc_ids each row is one sequence; with them each document is, a document being a
    run of equal ids within a row, as `positions_from_doc_ids` has it.
    """
    if doc_ids_BS is None:
        return torch.arange(0, B * S + 1, S, dtype=torch.int32, device=device)
    starts_BS = torch.ones(B, S, dtype=torch.bool, device=device)
    starts_BS[:, 1:] = doc_ids_BS[:, 1:] != doc_ids_BS[:, :-1]
    # The MoBA path's one host sync (the CUDA kernels have none): how many documents the batch
    # holds decides the length of cu_seqlens. Transformer.forward calls this once per forward
    # (per pipeline stage), not per layer. A fixed-length cu_seqlens padded with empty sequences
    # would avoid the sync, but the kernels size their block and tile grids by the sequence count.
    starts_N = starts_BS.flatten().nonzero().squeeze(1)
    end_1 = torch.full((1,), B * S, dtype=starts_N.dtype, device=device)
    return torch.cat([starts_N, end_1]).to(torch.int32)


@torch.compiler.disable
def _moba(q_THd, k_TKd, v_TKd, cu_seqlens_N, block_size: int, topk: int) -> torch.Tensor:
    # Outside any compiled graph: the reference walks the sequences in Python (`.tolist()`), and
    # the CUDA kernels are launched as they are, with their own bookkeeping; a compiled block
    # breaks its graph here.
    # Autocast off: q, k, v keep the dtype they come in (bf16 under mixed precision), and the
    # op computes the gate in fp32 as specified rather than autocast's bf16 einsum.
    with torch.autocast(q_THd.device.type, enabled=False):
        return moba_attention(q_THd, k_TKd, v_TKd, cu_seqlens_N, block_size, topk)


def set_full_attention(model: nn.Module, full: bool) -> int:
    """Make every MoBA layer of `model` run full attention (SDPA) or MoBA again; returns how many
    MoBA layers it holds. Layers that always use full attention are left alone."""
    layers = [m for m in model.modules() if isinstance(m, Attention) and m.moba]
    for attention in layers:
        attention.full_attention = full
    return len(layers)


def document_causal_mask(doc_ids_BS: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, S, S]: query i may see key j iff j <= i and both lie in the same document.

    Every document in a row needs its own id (a later document must not reuse an earlier one's).
    The diagonal is always allowed, so no query row is empty and softmax never sees all -inf.
    """
    S = doc_ids_BS.shape[1]
    causal_SS = torch.ones(S, S, dtype=torch.bool, device=doc_ids_BS.device).tril()
    same_doc_BSS = doc_ids_BS.unsqueeze(2) == doc_ids_BS.unsqueeze(1)
    return (same_doc_BSS & causal_SS).unsqueeze(1)


class Attention(nn.Module):
    """Multi-head attention with H query heads sharing K key/value heads (H % K == 0)."""

    def __init__(self, dim: int, attn_cfg: AttentionConfig, model_cfg: ModelConfig, layer_id: int = 0):
        super().__init__()
        self.moba = attn_cfg.uses_moba(layer_id, model_cfg.n_layers)
        """This layer runs MoBA (backend moba, not a hybrid full-attention layer)."""
        self.full_attention = False
        """Run SDPA even though `moba` is set (the end of training, see `set_full_attention`)."""
        self.moba_block_size = attn_cfg.moba_block_size
        self.moba_topk = attn_cfg.moba_topk
        self.n_heads = attn_cfg.n_heads
        self.n_kv_heads = attn_cfg.kv_heads()
        self.head_dim = attn_cfg.head_size(dim)
        self.rope_theta = attn_cfg.rope_theta
        self.max_seq_len = model_cfg.max_seq_len
        self.document_masking = attn_cfg.document_masking
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")

        bias = attn_cfg.qkv_bias
        self.wq = nn.Linear(dim, self.n_heads * self.head_dim, bias=bias)
        self.wk = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.wv = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, model_cfg.norm_eps) if attn_cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, model_cfg.norm_eps) if attn_cfg.qk_norm else None

        # Non-persistent: derived from the config, so checkpoints need not carry them.
        cos, sin = rope_tables(self.head_dim, self.max_seq_len, self.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(
        self,
        x_BSD: torch.Tensor,
        positions_BS: torch.Tensor,
        doc_ids_BS: torch.Tensor | None = None,
        cu_seqlens_N: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, S, D] -> [B, S, D]. `cu_seqlens_N`: the MoBA layers' `sequence_bounds` of this batch,
        computed here when not given (the transformer gives it, to compute it once per forward)."""
        B, S, _ = x_BSD.shape
        q_BSHd = self.wq(x_BSD).view(B, S, self.n_heads, self.head_dim)
        k_BSKd = self.wk(x_BSD).view(B, S, self.n_kv_heads, self.head_dim)
        v_BSKd = self.wv(x_BSD).view(B, S, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q_BSHd = self.q_norm(q_BSHd)
            k_BSKd = self.k_norm(k_BSKd)
        q_BSHd = apply_rope(q_BSHd, self.rope_cos, self.rope_sin, positions_BS)
        k_BSKd = apply_rope(k_BSKd, self.rope_cos, self.rope_sin, positions_BS)

        if self.runs_moba:
            if cu_seqlens_N is None:
                masked = doc_ids_BS is not None and self.document_masking
                cu_seqlens_N = sequence_bounds(doc_ids_BS if masked else None, B, S, x_BSD.device)
            # Packed varlen layout; MoBA reads shared K/V heads itself (no repeat).
            o_THd = _moba(
                q_BSHd.reshape(B * S, self.n_heads, self.head_dim),
                k_BSKd.reshape(B * S, self.n_kv_heads, self.head_dim),
                v_BSKd.reshape(B * S, self.n_kv_heads, self.head_dim),
                cu_seqlens_N,
                self.moba_block_size,
                self.moba_topk,
            )
            return self.wo(o_THd.reshape(B, S, self.n_heads * self.head_dim))

        q_BHSd = q_BSHd.transpose(1, 2)
        k_BKSd = k_BSKd.transpose(1, 2)
        v_BKSd = v_BSKd.transpose(1, 2)
        if doc_ids_BS is None or not self.document_masking:
            # enable_gqa lets the flash kernel read shared K/V heads without copying them.
            o_BHSd = F.scaled_dot_product_attention(q_BHSd, k_BKSd, v_BKSd, is_causal=True, enable_gqa=True)
        else:
            # The kernels that take a mask (memory-efficient, cuDNN) reject enable_gqa and would
            # fall back to the O(S^2)-memory math path, so the K/V heads are repeated instead.
            groups = self.n_heads // self.n_kv_heads
            if groups > 1:
                k_BKSd = k_BKSd.repeat_interleave(groups, dim=1)
                v_BKSd = v_BKSd.repeat_interleave(groups, dim=1)
            mask_B1SS = document_causal_mask(doc_ids_BS)
            o_BHSd = F.scaled_dot_product_attention(q_BHSd, k_BKSd, v_BKSd, attn_mask=mask_B1SS)
        return self.wo(o_BHSd.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))

    @property
    def runs_moba(self) -> bool:
        """Whether the next forward runs MoBA (else SDPA)."""
        return self.moba and not self.full_attention

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        for linear in (self.wq, self.wk, self.wv):
            nn.init.normal_(linear.weight, std=std)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
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
