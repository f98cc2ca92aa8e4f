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

from sparsetron.model.block import Block, uses_moe
from sparsetron.model.config import AttentionConfig, ModelConfig, MoEConfig
from sparsetron.model.layers import RMSNorm
from sparsetron.model.mtp import MultiTokenPrediction
from sparsetron.model.params import active_params, num_params
from sparsetron.model.sequence import SequenceInfo
from sparsetron.model.sigma_reparam import init_sigma_reparam, linear

__all__ = ["Block", "SequenceInfo", "Transformer", "active_params", "num_params", "run_pieces", "uses_moe"]


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
        self.mtp = MultiTokenPrediction(model_cfg, attn_cfg, moe_cfg) if model_cfg.mtp_depth else None
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
        return run_pieces(tokens_BS, seq, self.tok_embeddings, self.layers.values(), self.norm, self.output, self.mtp)

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
        # Fixed order: embedding, blocks by index, final norm, head, multi-token prediction (last, so
        # that the main model's initial values do not depend on it).
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
        if self.mtp is not None:
            self.mtp.init_weights(std, out_std)
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
        blocks = [layer for layer in self.layers.values() if layer is not None] if self.layers else []
        if self.mtp is not None:
            blocks += self.mtp.blocks()
        attentions = [block.attention for block in blocks]
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
    mtp: MultiTokenPrediction | None = None,
) -> torch.Tensor:
    """The forward of a run of the model's pieces: the whole model, or one pipeline stage.

    x: token ids [B, S] when `tok_embeddings` is given, else hidden states [B, S, D]. Returns
    logits [B, S, V] when `output` is given, else hidden states. Under autocast the residual
    stream starts in the autocast dtype (see the module docstring).

    Multi-token prediction runs when the batch carries its targets (`seq.mtp`, a training step):
    the embedding of the depths' input tokens, [B, S, K D], travels beside the hidden state
    (concatenated to it between pipeline stages: x is then [B, S, (1 + K) D]), and the last
    piece attaches the MTP loss to the logits' backward (model/mtp.py).
    """
    carried = None
    if tok_embeddings is not None:
        x = _embed(tok_embeddings, x)
        if seq.mtp is not None:
            carried = torch.cat([_embed(tok_embeddings, t) for t in seq.mtp.input_tokens_KBS.unbind(0)], dim=-1)
    elif seq.mtp is not None:
        x, carried = x.tensor_split([x.shape[-1] // (1 + seq.mtp.depth)], dim=-1)
    for block in blocks:
        x = block(x, seq)
    if output is None:
        return x if carried is None else torch.cat([x, carried], dim=-1)
    logits = output(norm(x))
    if carried is not None:
        if mtp is None:
            raise ValueError("the batch carries multi-token prediction targets, but the model has no MTP modules")
        logits = mtp.attach(logits, x, carried, seq, output)
    return logits


def _embed(tok_embeddings: nn.Embedding, tokens: torch.Tensor) -> torch.Tensor:
    """Token ids -> embeddings, cast to the autocast dtype under autocast (see the module docstring)."""
    x = tok_embeddings(tokens)
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
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
