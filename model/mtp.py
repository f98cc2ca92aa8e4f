"""Multi-token prediction (DeepSeek-V3, Ling 2.0): `model.mtp_depth` sequential modules after the
last block, module k predicting the token k + 1 positions ahead, trained beside the next-token loss.

Module k (1-based) at position i combines the previous depth's hidden state h^{k-1}_i (for k = 1
the main model's last hidden state, before its final norm) with the embedding of token t_{i+k}:

    h'_i   = proj([hidden_norm(h^{k-1}_i) ; embed_norm(Emb(t_{i+k}))])     2D -> D
    h^k    = Block(h')          a transformer block like the model's last (MoE where the model has MoE)
    loss_k = CE(head(norm(h^k_i)), t_{i+k+1})    the shared output head; the module's own final norm

over the positions whose target exists in the row and lies in the same document. The training loss
adds mtp_loss_weight / depth x sum_k loss_k. `MultiTokenPrediction` attaches that to the logits'
graph (`model.layers.AttachLoss`), so the step runner, the pipeline schedule and evaluation see only
the next-token loss, which keeps its meaning; evaluation and generation skip the modules.

Targets. Everything depth k needs comes from the micro-batch: the input token t_{i+k} is tokens[i + k]
(targets[S - 1] at i + k = S) and the target t_{i+k+1} is targets[i + k]. `MTPTargets.build` makes
both on the whole sequence, before any sharding, with the count of valid targets per depth; they
travel in the batch's `SequenceInfo` (`mtp`), so context parallelism shards them with the positions
and every pipeline stage sees them. A depth's loss is the mean over the whole micro-batch's valid
targets: a context-parallel rank divides its sum by its share of that count, so the mean over the
context ranks is the one-process mean.

Pipelines. The modules sit on the last stage with the head, the embedding on the first: the first
stage embeds the depths' input tokens and every stage passes them on beside the hidden state,
concatenated along the model dim ([B, S, D (1 + depth)] between stages while training; `run_pieces`
in model/transformer.py), so the shared embedding gets their gradient through the pipeline's backward
as in one process.

Shape legend: B batch, S sequence, D model dim, V vocabulary, K depths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparsetron.model.block import Block
from sparsetron.model.config import AttentionConfig, ModelConfig, MoEConfig
from sparsetron.model.layers import AttachLoss, RMSNorm
from sparsetron.model.sigma_reparam import linear

IGNORE = -100
"""The target id the losses skip (train.data's IGNORE_TARGET, and cross_entropy's default)."""


@dataclass
class MTPTargets:
    """What the multi-token prediction depths read of one micro-batch (see the module docstring)."""

    input_tokens_KBS: torch.Tensor
    """int64: depth k's input token at each position, t_{i+k} (0 past the row's end, where no target is)."""
    targets_KBS: torch.Tensor
    """int64: depth k's target at each position, t_{i+k+1}, or IGNORE."""
    counts_K: torch.Tensor
    """fp32: valid targets per depth in the whole micro-batch (before any sharding)."""
    shards: int = 1
    """How many context ranks share the positions (this rank holds 1 / shards of them)."""

    @classmethod
    @torch.no_grad()
    def build(
        cls, tokens_BS: torch.Tensor, targets_BS: torch.Tensor, doc_ids_BS: torch.Tensor | None, depth: int
    ) -> MTPTargets:
        """The depths' inputs and targets of a micro-batch; `doc_ids_BS` (None: one document per row)
        keeps every target inside its position's document."""
        B, S = tokens_BS.shape
        # The row's tokens followed by the one its last target names: t_0 .. t_S.
        last = targets_BS[:, -1:].clamp_min(0)
        stream_BS1 = torch.cat([tokens_BS, last], dim=1)
        inputs, targets = [], []
        for k in range(1, depth + 1):
            inputs_BS = torch.zeros_like(tokens_BS)
            targets_k = torch.full_like(targets_BS, IGNORE)
            if k <= S:
                inputs_BS[:, : S + 1 - k] = stream_BS1[:, k:]
            if k < S:
                shifted = targets_BS[:, k:]
                if doc_ids_BS is not None:
                    shifted = shifted.masked_fill(doc_ids_BS[:, k:] != doc_ids_BS[:, :-k], IGNORE)
                targets_k[:, : S - k] = shifted
            inputs.append(inputs_BS)
            targets.append(targets_k)
        targets_KBS = torch.stack(targets)
        counts_K = (targets_KBS != IGNORE).flatten(1).sum(1).to(torch.float32)
        return cls(torch.stack(inputs), targets_KBS, counts_K)

    @property
    def depth(self) -> int:
        return self.targets_KBS.shape[0]

    def shard(self, index_L: torch.Tensor, shards: int) -> MTPTargets:
        """A context rank's share: the positions `index_L` of every row, of `shards` equal shares."""
        return MTPTargets(self.input_tokens_KBS[:, :, index_L], self.targets_KBS[:, :, index_L], self.counts_K, shards)

    def to(self, device: torch.device | str) -> MTPTargets:
        return MTPTargets(
            self.input_tokens_KBS.to(device), self.targets_KBS.to(device), self.counts_K.to(device), self.shards
        )


class MTPLayer(nn.Module):
    """One depth: norms of the previous hidden state and of the input token's embedding, a 2D -> D
    projection of both, one transformer block, and the final norm before the shared head."""

    def __init__(self, layer_id: int, model_cfg: ModelConfig, attn_cfg: AttentionConfig, moe_cfg: MoEConfig | None):
        super().__init__()
        D = model_cfg.dim
        self.hidden_norm = RMSNorm(D, model_cfg.norm_eps)
        self.embed_norm = RMSNorm(D, model_cfg.norm_eps)
        self.proj = linear(2 * D, D, sigma_reparam=model_cfg.sigma_reparam)
        self.block = Block(layer_id, model_cfg, attn_cfg, moe_cfg)
        self.norm = RMSNorm(D, model_cfg.norm_eps)

    def forward(self, h_BSD: torch.Tensor, embedded_BSD: torch.Tensor, seq) -> tuple[torch.Tensor, torch.Tensor]:
        """This depth's hidden state [B, S, D], and its final norm of it (the head's input). The norm
        runs here, inside the layer's forward, where FSDP has its weights gathered."""
        joined = torch.cat([self.hidden_norm(h_BSD), self.embed_norm(embedded_BSD)], dim=-1)
        h_BSD = self.block(self.proj(joined), seq)
        return h_BSD, self.norm(h_BSD)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        self.hidden_norm.init_weights()
        self.embed_norm.init_weights()
        nn.init.normal_(self.proj.weight, std=std)
        self.block.init_weights(std, out_std)
        self.norm.init_weights()


class MultiTokenPrediction(nn.Module):
    """The `model.mtp_depth` modules; `attach(logits, h, embedded, seq, head)` adds their loss to the
    backward of `logits` (see the module docstring).

    `loss_scale` is the gradient the attached loss gets, besides its weight: 1 / micro-batches per
    step, as the next-token loss's mean (the step runner sets it; a pipeline schedule divides by the
    micro-batches itself: 1). Every forward that attaches the loss (a training forward; activation
    checkpointing re-runs blocks, not this) adds the depths' losses to the step's sums, which
    `step_means` averages and `close_step` records.
    """

    def __init__(self, model_cfg: ModelConfig, attn_cfg: AttentionConfig, moe_cfg: MoEConfig | None):
        super().__init__()
        n = model_cfg.n_layers
        self.depth = model_cfg.mtp_depth
        self.weight = model_cfg.mtp_loss_weight
        # Layer ids after the model's blocks: they name the MoE metrics of these blocks (moe/layer{id}/...).
        self.layers = nn.ModuleDict({str(k): MTPLayer(n + k, model_cfg, attn_cfg, moe_cfg) for k in range(self.depth)})
        self.loss_scale = 1.0
        # A plain attribute, not a buffer: it takes the losses' device and no dtype cast of the model rounds it.
        self.loss_sums_K: torch.Tensor | float = 0.0
        self.micro_batches = 0
        self.step_losses: list[float] | None = None
        """The depths' losses of the last closed step (mean over its micro-batches and data ranks)."""

    def attach(
        self,
        logits_BSV: torch.Tensor,
        h_BSD: torch.Tensor,
        embedded_BSKD: torch.Tensor,
        seq,
        head: nn.Module,
    ) -> torch.Tensor:
        """`logits_BSV` with the depths' weighted loss attached to its backward.

        h_BSD: the main model's last hidden state; embedded_BSKD: the embedding of each depth's input
        tokens, [B, S, K * D] (depth k in columns [k D, (k + 1) D)); `head`: the shared output head;
        `seq`: the batch's SequenceInfo, holding the depths' targets (`seq.mtp`)."""
        targets: MTPTargets = seq.mtp
        D = h_BSD.shape[-1]
        losses = []
        h = h_BSD
        for k, layer in enumerate(self.layers.values()):
            h, normed = layer(h, embedded_BSKD[..., k * D : (k + 1) * D], seq)
            logits = head(normed)
            # In fp32 (the logits are bf16 under autocast), or wider.
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            summed = F.cross_entropy(
                logits.flatten(0, 1), targets.targets_KBS[k].flatten(), ignore_index=IGNORE, reduction="sum"
            )
            # This rank's share of the whole micro-batch's mean (see the module docstring).
            losses.append(summed * targets.shards / targets.counts_K[k].clamp_min(1.0))
        losses_K = torch.stack(losses)
        self.loss_sums_K = self.loss_sums_K + losses_K.detach()
        self.micro_batches += 1
        return AttachLoss.apply(logits_BSV, losses_K.sum() * (self.weight / self.depth), self.loss_scale)

    @torch.no_grad()
    def step_means(self, device: torch.device) -> torch.Tensor:
        """[K] fp32: this step's per-depth losses, each averaged over the step's micro-batches."""
        sums = torch.as_tensor(self.loss_sums_K, dtype=torch.float32, device=device).expand(self.depth)
        return sums / max(self.micro_batches, 1)

    @torch.no_grad()
    def close_step(self, losses_K: torch.Tensor) -> None:
        """Record the step's per-depth losses (`step_means`, possibly averaged over ranks) and reset."""
        self.step_losses = losses_K.tolist()
        self.loss_sums_K = 0.0
        self.micro_batches = 0

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        for key in sorted(self.layers.keys(), key=int):
            self.layers[key].init_weights(std, out_std)
        self.loss_sums_K = 0.0
        self.micro_batches = 0
        self.step_losses = None

    def blocks(self) -> list[Block]:
        """The transformer blocks of the depths."""
        return [layer.block for layer in self.layers.values()]


def mtp_metrics(model: nn.Module) -> dict[str, float]:
    """`mtp/loss_{k}` (k = 1 .. depth) of the last closed step, on the ranks that hold the modules."""
    mtp = getattr(model, "mtp", None)
    if mtp is None or mtp.step_losses is None:
        return {}
    return {f"mtp/loss_{k + 1}": value for k, value in enumerate(mtp.step_losses)}
