"""Context parallelism: every sequence split over the `cp` ranks of mesh["cp"].

Shape legend: B rows, S positions per row, L = S / cp positions per rank, H query heads and K
key/value heads of this rank (after tensor parallelism), d head dim, b bytes per element.

Each cp rank holds L positions of every row in the load-balanced head-tail order
(`model.sequence_shard`: chunks r and 2 cp - 1 - r of 2 cp), with their tokens, targets and
rotary positions (`shard_batch`); everything but attention is per token and runs on them as
it is. Attention needs the other ranks' keys, and `apply_cp` wraps every layer's attention op
(DESIGN.md, principle 5) in one of two styles (`parallel.context_style`):

- ulysses (DeepSpeed-Ulysses): an all-to-all turns q, k, v [B, L, H, d] into whole sequences
  with a share of the heads, [B, S, H / cp, d]; the op (SDPA, varlen flash attention, MoBA)
  runs unchanged on the whole sequences; an all-to-all turns the output back. Needs H and K
  divisible by cp. Per layer and rank it sends (cp - 1) / cp of q, k, v and o: forward
  (2 H + 2 K) B L d b, as much again in the backward.
- allgather (Megatron's choice for block-sparse attention): queries stay; k and v are
  all-gathered whole, [B, S, K, d], and the op attends this rank's queries against them chunk
  by chunk (a chunk's queries against the keys before its end, varlen layout with separate
  query and key sequences, `model.attention_ops.per_chunk`); the backward reduce-scatters the
  key and value gradients back to their ranks. Any cp; MoBA computes its block means from the
  gathered keys. Per layer and rank it receives (cp - 1) / cp of the whole k and v: forward
  2 K B S d b (cp - 1) / cp, as much again in the backward's reduce-scatter. With GQA (K << H)
  that is less than Ulysses moves at small cp; at large cp Ulysses' volume falls as 1 / cp
  while this one stays ~2 K B S d b.

Both give the same function as one process, in exact arithmetic: the whole documents
(`SequenceInfo`, built once on the whole sequence) decide every mask and MoBA block.

The wrappers run outside compiled graphs (a compiled block breaks its graph at attention, as
it does at MoBA): the chunks' varlen layouts carry per-batch integers that would recompile it.

Gradients: each cp rank's loss is the mean over its own tokens, and FSDP averages the
gradients over dp_shard x cp (parallel/fsdp.py), so the mean of equal-sized parts is the
whole's mean. MoE balancing statistics are summed over cp x tp (`balancing.TokenSplit`).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from sparsetron.model.attention import Attention
from sparsetron.model.attention_ops import AttentionOp
from sparsetron.model.config import AttentionConfig, ConfigError
from sparsetron.model.sequence import SequenceInfo
from sparsetron.model.sequence_shard import shard_sequence

__all__ = ["AllGatherAttention", "UlyssesAttention", "apply_cp", "check_cp", "shard_batch"]


def check_cp(cp: int, tp: int, style: str, seq_len: int, attn_cfg: AttentionConfig, n_layers: int) -> None:
    """Refuse, before any process group exists, a layout context parallelism cannot split (errors
    name the keys and numbers)."""
    if cp == 1:
        return
    moba = attn_cfg.backend == "moba" and any(attn_cfg.uses_moba(i, n_layers) for i in range(n_layers))
    chunks = 2 * cp * (attn_cfg.moba_block_size if moba else 1)
    unit = math.lcm(chunks, cp * tp)  # tensor parallelism splits each rank's S / cp further
    if seq_len % unit:
        why = f"2 x parallel.context {cp}" + (
            f" x attention.moba_block_size {attn_cfg.moba_block_size}" if moba else ""
        )
        if tp > 1:
            why += f", and by parallel.context x parallel.tensor = {cp * tp}"
        raise ConfigError(
            f"data.seq_len={seq_len} must be divisible by {why} (context parallelism gives each rank two "
            "equal chunks of every sequence" + (", whole MoBA blocks" if moba else "") + f"): a multiple of {unit}"
        )
    if style == "ulysses":
        n_heads, n_kv_heads = attn_cfg.n_heads, attn_cfg.kv_heads()
        if n_heads % (tp * cp) or n_kv_heads % (tp * cp):
            raise ConfigError(
                f"parallel.context_style=ulysses splits the heads over parallel.tensor x parallel.context = "
                f"{tp} x {cp} = {tp * cp} ranks, which must divide attention.n_heads={n_heads} and "
                f"attention.n_kv_heads={n_kv_heads}; context_style=allgather takes any context degree"
            )


def shard_batch(
    tokens_BS: torch.Tensor, targets_BS: torch.Tensor, whole: SequenceInfo, rank: int, ranks: int
) -> tuple[torch.Tensor, torch.Tensor, SequenceInfo]:
    """This context rank's tokens, targets [B, L] and SequenceInfo of a whole batch."""
    seq = shard_sequence(whole, rank, ranks)
    index_L = seq.context.index_S
    return tokens_BS[:, index_L], targets_BS[:, index_L], seq


def _to_whole_sequences(x_BLHd: torch.Tensor, seq: SequenceInfo, group: dist.ProcessGroup) -> torch.Tensor:
    """Ulysses' first all-to-all: this rank's positions of all heads -> all positions of its
    share of the heads, [B, L, H, d] -> [B, S, H / cp, d] in position order."""
    cp = seq.context.ranks
    B, L, H, d = x_BLHd.shape
    # Head group g goes to rank g; what arrives from rank r is rank r's positions.
    send = x_BLHd.view(B, L, cp, H // cp, d).permute(2, 0, 1, 3, 4).reshape(cp * B, L, H // cp, d)
    received = funcol.all_to_all_single_autograd(send.contiguous(), None, None, group)
    by_rank_BShd = received.view(cp, B, L, H // cp, d).transpose(0, 1).reshape(B, cp * L, H // cp, d)
    return by_rank_BShd[:, seq.context.natural_S]


def _to_own_positions(o_BShd: torch.Tensor, seq: SequenceInfo, group: dist.ProcessGroup) -> torch.Tensor:
    """Ulysses' second all-to-all, the first one's inverse: [B, S, H / cp, d] -> [B, L, H, d]."""
    cp = seq.context.ranks
    B, S, h, d = o_BShd.shape
    L = S // cp
    # Positions of rank r go to rank r; what arrives from rank g is head group g.
    send = o_BShd[:, seq.context.order_S].view(B, cp, L, h, d).transpose(0, 1).reshape(cp * B, L, h, d)
    received = funcol.all_to_all_single_autograd(send.contiguous(), None, None, group)
    return received.view(cp, B, L, h, d).permute(1, 2, 0, 3, 4).reshape(B, L, cp * h, d)


def _gather_sequence(x_BLKd: torch.Tensor, seq: SequenceInfo, group: dist.ProcessGroup) -> torch.Tensor:
    """Every rank's positions, [B, L, K, d] -> [B, S, K, d] in position order; the backward
    reduce-scatters the gradient back (each rank gets the sum of every rank's use of its keys)."""
    cp = seq.context.ranks
    B, L, K, d = x_BLKd.shape
    gathered = funcol.all_gather_single_autograd(x_BLKd.contiguous(), 0, group)
    by_rank_BSKd = gathered.view(cp, B, L, K, d).transpose(0, 1).reshape(B, cp * L, K, d)
    return by_rank_BSKd[:, seq.context.natural_S]


class _ContextParallelOp:
    """An attention op over a context-parallel rank's shard of every row: `inner` with the other
    ranks' positions brought in by a collective over `group` (mesh["cp"]'s)."""

    def __init__(self, inner: AttentionOp, group: dist.ProcessGroup):
        self.inner = inner
        self.group = group

    @torch.compiler.disable
    def __call__(self, q_BLHd: torch.Tensor, k_BLKd: torch.Tensor, v_BLKd: torch.Tensor, seq: SequenceInfo):
        if seq.context is None or seq.context.ranks != dist.get_world_size(self.group):
            ranks = None if seq.context is None else seq.context.ranks
            raise ValueError(
                f"context-parallel attention over {dist.get_world_size(self.group)} ranks needs the batch sharded "
                f"over them (parallel.context_parallel.shard_batch), got a SequenceInfo sharded over {ranks}"
            )
        return self._attend(q_BLHd, k_BLKd, v_BLKd, seq)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"


class UlyssesAttention(_ContextParallelOp):
    """`inner` on whole sequences with a share of the heads (module docstring)."""

    def _attend(self, q_BLHd, k_BLKd, v_BLKd, seq: SequenceInfo) -> torch.Tensor:
        q, k, v = (_to_whole_sequences(t, seq, self.group) for t in (q_BLHd, k_BLKd, v_BLKd))
        return _to_own_positions(self.inner(q, k, v, seq.context.whole), seq, self.group)


class AllGatherAttention(_ContextParallelOp):
    """`inner` on this rank's queries against the all-gathered keys and values (module docstring)."""

    def _attend(self, q_BLHd, k_BLKd, v_BLKd, seq: SequenceInfo) -> torch.Tensor:
        k, v = (_gather_sequence(t, seq, self.group) for t in (k_BLKd, v_BLKd))
        return self.inner(q_BLHd, k, v, seq)


STYLES = {"ulysses": UlyssesAttention, "allgather": AllGatherAttention}


def apply_cp(model: nn.Module, group: dist.ProcessGroup, style: str) -> None:
    """Wrap every attention layer's ops (its configured op and its full-attention fallback) in
    the context-parallel `style` over `group` (mesh["cp"]'s). Run on the plain model, before
    compile and activation checkpointing wrap the blocks."""
    wrapper = STYLES[style]
    for attention in [m for m in model.modules() if isinstance(m, Attention)]:
        attention.op = wrapper(attention.op, group)
        attention.full_op = wrapper(attention.full_op, group)
