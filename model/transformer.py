"""The decoder-only transformer: embedding, a stack of pre-norm blocks, final norm, output head.

Built on the meta device and materialised afterwards (DESIGN.md, principle 3):

    with torch.device("meta"):
        model = Transformer(model_cfg, attn_cfg, moe_cfg)
    model.to_empty(device="cpu")
    model.init_weights()

which `materialised_transformer` does in one call, for a whole model on one device.

Pipeline stages cut the model by setting `tok_embeddings`, `norm`, `output` or entries of
`layers` to None (or deleting layers); forward skips whatever is missing.

Shape legend: B batch, S sequence, D model dim, V vocabulary.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsetron.model.attention import Attention, sequence_bounds
from sparsetron.model.config import AttentionConfig, ModelConfig, MoEConfig
from sparsetron.model.layers import FeedForward, RMSNorm, positions_from_doc_ids
from sparsetron.model.moe.layer import MoE
from sparsetron.model.params import active_params, num_params

__all__ = ["Block", "Transformer", "active_params", "num_params", "uses_moe"]


def uses_moe(layer_id: int, moe_cfg: MoEConfig | None) -> bool:
    """Whether block `layer_id` has a MoE layer rather than a dense FFN."""
    return moe_cfg is not None and moe_cfg.enabled and layer_id >= moe_cfg.first_k_dense


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then h + ffn(norm(h))."""

    def __init__(
        self, layer_id: int, model_cfg: ModelConfig, attn_cfg: AttentionConfig, moe_cfg: MoEConfig | None = None
    ):
        super().__init__()
        self.layer_id = layer_id
        self.is_moe = uses_moe(layer_id, moe_cfg)
        self.attention_norm = RMSNorm(model_cfg.dim, model_cfg.norm_eps)
        self.attention = Attention(model_cfg.dim, attn_cfg, model_cfg, layer_id)
        self.ffn_norm = RMSNorm(model_cfg.dim, model_cfg.norm_eps)
        if self.is_moe:
            self.feed_forward = MoE(model_cfg.dim, model_cfg, moe_cfg)
        else:
            self.feed_forward = FeedForward(model_cfg.dim, model_cfg.ffn_hidden)

    def forward(
        self,
        x_BSD: torch.Tensor,
        positions_BS: torch.Tensor,
        doc_ids_BS: torch.Tensor | None = None,
        cu_seqlens_N: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`cu_seqlens_N`: the batch's sequence bounds for MoBA (see `Attention.forward`)."""
        h_BSD = x_BSD + self.attention(self.attention_norm(x_BSD), positions_BS, doc_ids_BS, cu_seqlens_N)
        return h_BSD + self.feed_forward(self.ffn_norm(h_BSD))

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        self.attention_norm.init_weights()
        self.attention.init_weights(std, out_std)
        self.ffn_norm.init_weights()
        self.feed_forward.init_weights(std, out_std)


class Transformer(nn.Module):
    """Decoder-only language model. `moe_cfg` None or with num_experts 0 gives a dense model."""

    def __init__(self, model_cfg: ModelConfig, attn_cfg: AttentionConfig, moe_cfg: MoEConfig | None = None):
        super().__init__()
        if model_cfg.vocab_size <= 0:
            raise ValueError(
                f"model.vocab_size is {model_cfg.vocab_size}; resolve it from the tokenizer before building the model"
            )
        self.model_cfg = model_cfg
        self.attn_cfg = attn_cfg
        self.moe_cfg = moe_cfg
        self.tok_embeddings = nn.Embedding(model_cfg.vocab_size, model_cfg.dim)
        self.layers = nn.ModuleDict({str(i): Block(i, model_cfg, attn_cfg, moe_cfg) for i in range(model_cfg.n_layers)})
        self.norm = RMSNorm(model_cfg.dim, model_cfg.norm_eps)
        self.output = nn.Linear(model_cfg.dim, model_cfg.vocab_size, bias=False)
        self._tie_embeddings()
        self._share_rope_tables()

    def forward(
        self,
        tokens_BS: torch.Tensor,
        doc_ids_BS: torch.Tensor | None = None,
        *,
        positions_BS: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, S, V] (hidden states [B, S, D] when `output` is None).

        tokens_BS: token ids, or hidden states [B, S, D] when `tok_embeddings` is None.
        doc_ids_BS: document of each token when several are packed in a row; with
            attention.document_masking, positions restart and attention stops at each document.
        positions_BS: explicit rotary positions, for callers that hold only a slice of the
            sequence (context parallelism) and so cannot derive them here.
        """
        B, S = tokens_BS.shape[:2]
        if S > self.model_cfg.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds model.max_seq_len={self.model_cfg.max_seq_len}")
        if positions_BS is None:
            if doc_ids_BS is not None and self.attn_cfg.document_masking:
                positions_BS = positions_from_doc_ids(doc_ids_BS)
            else:
                # doc_ids span the whole sequence also where the hidden states hold a part of it
                # (a pipeline stage under sequence parallelism).
                length = doc_ids_BS.shape[1] if doc_ids_BS is not None else S
                positions_BS = torch.arange(length, device=tokens_BS.device).expand(B, length)
        if not self.attn_cfg.document_masking:
            doc_ids_BS = None
        cu_seqlens_N = None
        if self.attn_cfg.backend == "moba" and self.layers is not None:
            # Once per forward (per pipeline stage), for all MoBA layers: with documents this is
            # the model's one host sync (see `sequence_bounds`; the CUDA kernels have none).
            # Under sequence parallelism the hidden states hold S / tp positions, the positions all S.
            if any(m.runs_moba for m in self.layers.modules() if isinstance(m, Attention)):
                cu_seqlens_N = sequence_bounds(doc_ids_BS, B, positions_BS.shape[-1], positions_BS.device)

        h_BSD = self.tok_embeddings(tokens_BS) if self.tok_embeddings is not None else tokens_BS
        for layer in self.layers.values() if self.layers is not None else ():
            if layer is not None:
                h_BSD = layer(h_BSD, positions_BS, doc_ids_BS, cu_seqlens_N)
        if self.norm is not None:
            h_BSD = self.norm(h_BSD)
        return self.output(h_BSD) if self.output is not None else h_BSD

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter and buffer; deterministic given torch's global RNG state."""
        std = self.model_cfg.init_std
        # Each block adds two projections to the residual stream; scaling them keeps the
        # stream's variance independent of depth (GPT-2).
        out_std = std / math.sqrt(2 * self.model_cfg.n_layers)
        self._tie_embeddings()
        # Fixed order: embedding, blocks by index, final norm, head.
        if self.tok_embeddings is not None:
            nn.init.normal_(self.tok_embeddings.weight, std=std)
        if self.layers is not None:
            for key in sorted(self.layers.keys(), key=int):
                if self.layers[key] is not None:
                    self.layers[key].init_weights(std, out_std)
        if self.norm is not None:
            self.norm.init_weights()
        if self.output is not None and not self._is_tied():
            nn.init.normal_(self.output.weight, std=std)
        self._share_rope_tables()

    def _is_tied(self) -> bool:
        return (
            self.tok_embeddings is not None
            and self.output is not None
            and self.output.weight is self.tok_embeddings.weight
        )

    def _tie_embeddings(self) -> None:
        if self.model_cfg.tie_embeddings and self.tok_embeddings is not None and self.output is not None:
            if not self._is_tied():
                self.output.weight = self.tok_embeddings.weight

    def _share_rope_tables(self) -> None:
        # Every layer's rotary tables are equal; one copy saves max_seq_len * head_dim * 4 bytes
        # per layer, which is tens of MB per layer at long context.
        attentions = [layer.attention for layer in self.layers.values() if layer is not None] if self.layers else []
        for attention in attentions[1:]:
            attention.rope_cos = attentions[0].rope_cos
            attention.rope_sin = attentions[0].rope_sin

    def _apply(self, fn, recurse=True):
        # Moving off the meta device (to_empty) gives each module a fresh Parameter, which
        # silently unties the head from the embedding, and a move copies each layer's rope
        # buffers separately; restore both kinds of sharing.
        super()._apply(fn, recurse)
        self._tie_embeddings()
        self._share_rope_tables()
        return self


def materialised_transformer(
    model_cfg: ModelConfig, attn_cfg: AttentionConfig, moe_cfg: MoEConfig | None = None, device="cpu"
) -> Transformer:
    """A whole Transformer built on the meta device, then materialised and initialised on `device`
    (from torch's current random state)."""
    with torch.device("meta"):
        model = Transformer(model_cfg, attn_cfg, moe_cfg)
    model.to_empty(device=device)
    model.init_weights()
    return model
