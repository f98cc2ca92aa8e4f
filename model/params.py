"""Parameter counts: what a model holds, and what one token touches (the N in 6N FLOPs/token for MFU)."""

from __future__ import annotations

from torch import nn

from sparsetron.model.config import AttentionConfig, ModelConfig, MoEConfig


def num_params(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Parameters held by `model`, each shared tensor counted once.

    exclude_embeddings leaves out the input embedding table, which is a lookup and costs no
    FLOPs; a tied output head stays counted because its matmul does.
    """
    params = {id(p): p for p in model.parameters()}
    embedding = getattr(model, "tok_embeddings", None)
    output = getattr(model, "output", None)
    if exclude_embeddings and embedding is not None:
        tied = output is not None and output.weight is embedding.weight
        if not tied:
            for p in embedding.parameters():
                params.pop(id(p), None)
    return sum(p.numel() for p in params.values())


def _swiglu(dim: int, hidden: int) -> int:
    return 3 * dim * hidden


def active_params(model_cfg: ModelConfig, attn_cfg: AttentionConfig, moe_cfg: MoEConfig | None = None) -> int:
    """Parameters one token's forward multiplies with: every dense weight, the router, the shared
    experts, the dispatch projections (moe.dispatch_dim) and top_k x granularity routed experts
    per MoE layer, the output head, and the multi-token prediction depths (each a block, its norms,
    its 2D -> D projection and one more pass through the head). The input embedding is left out,
    as in `num_params(model, exclude_embeddings=True)`, which this equals for a dense model.
    """
    D = model_cfg.dim
    head = D + D * model_cfg.vocab_size  # final norm, output head
    blocks = sum(_block_active_params(i, model_cfg, attn_cfg, moe_cfg) for i in range(model_cfg.n_layers))
    n = model_cfg.n_layers
    mtp = sum(
        _block_active_params(n + k, model_cfg, attn_cfg, moe_cfg) + 2 * D + 2 * D * D + head
        for k in range(model_cfg.mtp_depth)
    )
    return blocks + head + mtp


def _block_active_params(
    layer_id: int, model_cfg: ModelConfig, attn_cfg: AttentionConfig, moe_cfg: MoEConfig | None
) -> int:
    D = model_cfg.dim
    H, K, d = attn_cfg.n_heads, attn_cfg.kv_heads(), attn_cfg.head_size(D)
    attention = D * H * d + 2 * D * K * d + H * d * D + (2 * d if attn_cfg.qk_norm else 0)
    if attn_cfg.qkv_bias:
        attention += H * d + 2 * K * d
    total = attention + 2 * D  # and the two norms
    if moe_cfg is not None and moe_cfg.enabled and layer_id >= moe_cfg.first_k_dense:
        hidden, R = moe_cfg.hidden_size(model_cfg), moe_cfg.expert_dim(model_cfg)
        total += D * moe_cfg.routed_experts  # router
        if moe_cfg.dispatch_dim:
            total += 2 * D * R  # the descending and ascending projections
        total += moe_cfg.experts_per_token * _swiglu(R, hidden)
        if moe_cfg.n_shared_experts:
            total += _swiglu(D, moe_cfg.shared_hidden_size(model_cfg))
            if moe_cfg.shared_expert_gate:
                total += D
    else:
        total += _swiglu(D, model_cfg.ffn_hidden)
    return total
