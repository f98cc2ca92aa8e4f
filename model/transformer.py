"""The decoder-only transformer: embedding, a stack of pre-norm blocks, final norm, output head.

Built on the meta device and materialised afterwards (DESIGN.md, principle 3):

    with torch.device("meta"):
        model = Transformer(model_cfg, attn_cfg, moe_cfg)
    model.to_empty(device="cpu")
    model.init_weights()

which `materialised_transformer` does in one call, for a whole model on one device.

A forward takes the batch's `SequenceInfo` (positions, documents; `sequence_info` builds it
once per batch, before any sharding) and hands it to every block. Pipeline stages cut the model
by setting `tok_embeddings`, `norm`, `output` or entries of `layers` to None (or deleting
layers) and run their pieces with `run_pieces`, as `Transformer.forward` runs all of them.

Under autocast the residual stream is carried in the autocast dtype, as FSDP's mixed precision
(bf16 parameters) carries it: the embedding's output is cast (see parallel/precision.py).

Shape legend: B batch, S sequence, D model dim, V vocabulary.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsetron.model.attention import Attention
from sparsetron.model.config import AttentionConfig, ModelConfig, MoEConfig
from sparsetron.model.layers import FeedForward, RMSNorm
from sparsetron.model.moe.layer import MoE
from sparsetron.model.params import active_params, num_params
from sparsetron.model.sequence import SequenceInfo
from sparsetron.model.sigma_reparam import init_sigma_reparam, linear

__all__ = ["Block", "SequenceInfo", "Transformer", "active_params", "num_params", "run_pieces", "uses_moe"]


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
            self.feed_forward = FeedForward(model_cfg.dim, model_cfg.ffn_hidden, model_cfg.sigma_reparam)

    def forward(self, x_BSD: torch.Tensor, seq: SequenceInfo) -> torch.Tensor:
        h_BSD = x_BSD + self.attention(self.attention_norm(x_BSD), seq)
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
        self.output = linear(model_cfg.dim, model_cfg.vocab_size, sigma_reparam=model_cfg.sigma_reparam)
        self._tie_embeddings()
        self._share_rope_tables()

    def forward(self, tokens_BS: torch.Tensor, seq: SequenceInfo | None = None) -> torch.Tensor:
        """Logits [B, S, V] of token ids [B, S].

        seq: the batch's sequences (`sequence_info`); None when each row is one sequence.
        """
        if seq is None:
            seq = self.sequence_info(tokens_BS)
        elif tuple(seq.positions_BS.shape) != tuple(tokens_BS.shape[:2]):
            raise ValueError(
                f"the SequenceInfo describes [B, S] = {list(seq.positions_BS.shape)}, the tokens are "
                f"{list(tokens_BS.shape[:2])}: build it from this batch (Transformer.sequence_info)"
            )
        self._check_length(seq.seq_len)
        return run_pieces(tokens_BS, seq, self.tok_embeddings, self.layers.values(), self.norm, self.output)

    def sequence_info(self, tokens_BS: torch.Tensor, doc_ids_BS: torch.Tensor | None = None) -> SequenceInfo:
        """The `SequenceInfo` of a batch of token ids [B, S] whose rows hold the documents `doc_ids_BS`
        (masked from each other with attention.document_masking); refuses sequences over max_seq_len."""
        B, S = tokens_BS.shape[:2]
        self._check_length(S)
        masked = doc_ids_BS if self.attn_cfg.document_masking else None
        return SequenceInfo.build(B, S, masked, device=tokens_BS.device)

    def _check_length(self, S: int) -> None:
        if S > self.model_cfg.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds model.max_seq_len={self.model_cfg.max_seq_len}")

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


def run_pieces(
    x: torch.Tensor,
    seq: SequenceInfo,
    tok_embeddings: nn.Embedding | None,
    blocks,
    norm: RMSNorm | None,
    output: nn.Linear | None,
) -> torch.Tensor:
    """The forward of a run of the model's pieces: the whole model, or one pipeline stage.

    x: token ids [B, S] when `tok_embeddings` is given, else hidden states [B, S, D]. Returns
    logits [B, S, V] when `output` is given, else hidden states. Under autocast the residual
    stream starts in the autocast dtype (see the module docstring).
    """
    if tok_embeddings is not None:
        x = tok_embeddings(x)
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
    for block in blocks:
        x = block(x, seq)
    if output is not None:
        x = output(norm(x))
    return x


def materialised_transformer(
    model_cfg: ModelConfig, attn_cfg: AttentionConfig, moe_cfg: MoEConfig | None = None, device="cpu"
) -> Transformer:
    """A whole Transformer built on the meta device, then materialised and initialised on `device`
    (from torch's current random state; model.sigma_reparam's gammas and vectors from the weights)."""
    with torch.device("meta"):
        model = Transformer(model_cfg, attn_cfg, moe_cfg)
    model.to_empty(device=device)
    model.init_weights()
    init_sigma_reparam(model)
    return model
