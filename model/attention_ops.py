"""The attention ops: what a layer calls once it has q, k and v (DESIGN.md, principle 5).

Every op has the signature `op(q_BSHd, k_BSKd, v_BSKd, seq) -> o_BSHd`, with `seq` the batch's
`SequenceInfo`; `attention_op` chooses one from the config, once, when a layer is built:

- `full_attention`: causal attention; plain SDPA (flash, GQA read in place) when each row is
  one sequence, variable-length attention over the packed documents when rows hold several
  (`kernels.varlen`: FlashAttention's varlen kernel on CUDA, no S x S mask; a dense-mask
  reference on the CPU);
- `MobaAttention`: Mixture of Block Attention (`kernels.moba`) over the batch's sequences.

Context parallelism (`parallel.context_parallel`) wraps these ops without reaching into the
layers that call them: Ulysses hands them whole sequences with a share of the heads; the
all-gather style hands them this rank's queries against whole keys, with a `seq` whose
`context` (model.sequence_shard.ContextShard) says which positions the queries are. The ops
then attend chunk by chunk: each chunk's queries against the keys before its end.

Shape legend: B rows, S positions per row, T = B * S tokens, H query heads, K key/value heads,
d head dim, C positions of a chunk, U = its end (keys it sees).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sparsetron.kernels.moba import moba_attention
from sparsetron.kernels.varlen import varlen_attention
from sparsetron.model.config import AttentionConfig
from sparsetron.model.sequence import SequenceInfo
from sparsetron.model.sequence_shard import QueryChunk

AttentionOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, SequenceInfo], torch.Tensor]


def per_chunk(chunk_op, q_BSHd: torch.Tensor, k_BSKd: torch.Tensor, v_BSKd: torch.Tensor, seq: SequenceInfo):
    """A context-parallel rank's queries q [B, S / cp, H, d] against the whole keys k, v [B, S, K, d]:
    `chunk_op(q_BCHd, k_BUKd, v_BUKd, chunk, whole)` for each of its chunks, outputs in local order."""
    shard = seq.context
    if k_BSKd.shape[1] != shard.whole.seq_len:
        raise ValueError(
            f"a context shard's queries attend to the whole {shard.whole.seq_len} keys of a row, got {k_BSKd.shape[1]}"
        )
    outputs = []
    for chunk in shard.chunks:
        U = chunk.global_end
        q_BCHd = q_BSHd[:, chunk.local_start : chunk.local_start + chunk.length]
        outputs.append(chunk_op(q_BCHd, k_BSKd[:, :U], v_BSKd[:, :U], chunk, shard.whole))
    return torch.cat(outputs, dim=1)


def _full_chunk(q_BCHd, k_BUKd, v_BUKd, chunk: QueryChunk, whole: SequenceInfo) -> torch.Tensor:
    doc_ids_BU = whole.doc_ids_BS[:, : chunk.global_end] if whole.doc_ids_BS is not None else None
    return varlen_attention(
        q_BCHd,
        k_BUKd,
        v_BUKd,
        doc_ids_BU,
        chunk.cu_seqlens_q,
        chunk.max_seqlen_q,
        chunk.cu_seqlens_k,
        chunk.max_seqlen_k,
    )


def full_attention(q_BSHd: torch.Tensor, k_BSKd: torch.Tensor, v_BSKd: torch.Tensor, seq: SequenceInfo) -> torch.Tensor:
    """Causal attention within each sequence of `seq` (rows, or packed documents)."""
    if seq.context is not None:
        return per_chunk(_full_chunk, q_BSHd, k_BSKd, v_BSKd, seq)
    if seq.doc_ids_BS is not None:
        return varlen_attention(q_BSHd, k_BSKd, v_BSKd, seq.doc_ids_BS, seq.cu_seqlens_N, seq.max_seqlen)
    q_BHSd, k_BKSd, v_BKSd = (t.transpose(1, 2) for t in (q_BSHd, k_BSKd, v_BSKd))
    # enable_gqa lets the flash kernel read shared K/V heads without copying them.
    o_BHSd = F.scaled_dot_product_attention(q_BHSd, k_BKSd, v_BKSd, is_causal=True, enable_gqa=True)
    return o_BHSd.transpose(1, 2)


@torch.compiler.disable
def _moba(q_THd, k_UKd, v_UKd, cu_seqlens_N, block_size: int, topk: int, cu_seqlens_k=None) -> torch.Tensor:
    # Outside any compiled graph: the reference walks the sequences in Python (`.tolist()`), and
    # the CUDA kernels are launched as they are, with their own bookkeeping; a compiled block
    # breaks its graph here.
    # Autocast off: q, k, v keep the dtype they come in (bf16 under mixed precision), and the
    # op computes the gate in fp32 as specified rather than autocast's bf16 einsum.
    with torch.autocast(q_THd.device.type, enabled=False):
        return moba_attention(q_THd, k_UKd, v_UKd, cu_seqlens_N, block_size, topk, cu_seqlens_k=cu_seqlens_k)


class MobaAttention:
    """MoBA over the batch's sequences (../shared/specs/moba.md), which it reads packed."""

    def __init__(self, block_size: int, topk: int):
        self.block_size = block_size
        self.topk = topk

    def __call__(self, q_BSHd: torch.Tensor, k_BSKd: torch.Tensor, v_BSKd: torch.Tensor, seq: SequenceInfo):
        if seq.context is not None:
            return per_chunk(self._chunk, q_BSHd, k_BSKd, v_BSKd, seq)
        return self._packed(q_BSHd, k_BSKd, v_BSKd, seq.cu_seqlens_N)

    def _chunk(self, q_BCHd, k_BUKd, v_BUKd, chunk: QueryChunk, whole: SequenceInfo) -> torch.Tensor:
        """A chunk's queries against the keys before its end: blocks count from each document's
        start, so a query routes among the same blocks as in the whole sequence."""
        return self._packed(q_BCHd, k_BUKd, v_BUKd, chunk.cu_seqlens_q, chunk.cu_seqlens_k)

    def _packed(self, q_BQHd, k_BUKd, v_BUKd, cu_seqlens_q, cu_seqlens_k=None) -> torch.Tensor:
        """MoBA over the rows flattened into sequences; MoBA reads shared K/V heads itself (no repeat)."""
        B, Q, H, d = q_BQHd.shape
        U, K = k_BUKd.shape[1:3]
        o_THd = _moba(
            q_BQHd.reshape(B * Q, H, d),
            k_BUKd.reshape(B * U, K, d),
            v_BUKd.reshape(B * U, K, d),
            cu_seqlens_q,
            self.block_size,
            self.topk,
            cu_seqlens_k,
        )
        return o_THd.view(B, Q, H, d)

    def __repr__(self) -> str:
        return f"MobaAttention(block_size={self.block_size}, topk={self.topk})"


def attention_op(attn_cfg: AttentionConfig, layer_id: int, n_layers: int) -> AttentionOp:
    """The op layer `layer_id` of `n_layers` runs: MoBA where the config says, else full attention."""
    if attn_cfg.uses_moba(layer_id, n_layers):
        return MobaAttention(attn_cfg.moba_block_size, attn_cfg.moba_topk)
    return full_attention
