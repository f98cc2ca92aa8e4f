"""The attention ops: what a layer calls once it has q, k and v (DESIGN.md, principle 5).

Every op has the signature `op(q_BSHd, k_BSKd, v_BSKd, seq) -> o_BSHd`, with `seq` the batch's
`SequenceInfo`; `attention_op` chooses one from the config, once, when a layer is built:

- `full_attention`: causal attention; plain SDPA (flash, GQA read in place) when each row is
  one sequence, variable-length attention over the packed documents when rows hold several
  (`kernels.varlen`: FlashAttention's varlen kernel on CUDA, no S x S mask; a dense-mask
  reference on the CPU);
- `MobaAttention`: Mixture of Block Attention (`kernels.moba`) over the batch's sequences.

Context parallelism will wrap these ops (exchanging heads or keys around them) without
reaching into the layers that call them.

Shape legend: B rows, S positions per row, T = B * S tokens, H query heads, K key/value heads,
d head dim.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sparsetron.kernels.moba import moba_attention
from sparsetron.kernels.varlen import varlen_attention
from sparsetron.model.config import AttentionConfig
from sparsetron.model.sequence import SequenceInfo

AttentionOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, SequenceInfo], torch.Tensor]


def full_attention(q_BSHd: torch.Tensor, k_BSKd: torch.Tensor, v_BSKd: torch.Tensor, seq: SequenceInfo) -> torch.Tensor:
    """Causal attention within each sequence of `seq` (rows, or packed documents)."""
    if seq.doc_ids_BS is not None:
        return varlen_attention(q_BSHd, k_BSKd, v_BSKd, seq.doc_ids_BS, seq.cu_seqlens_N, seq.max_seqlen)
    q_BHSd, k_BKSd, v_BKSd = (t.transpose(1, 2) for t in (q_BSHd, k_BSKd, v_BSKd))
    # enable_gqa lets the flash kernel read shared K/V heads without copying them.
    o_BHSd = F.scaled_dot_product_attention(q_BHSd, k_BKSd, v_BKSd, is_causal=True, enable_gqa=True)
    return o_BHSd.transpose(1, 2)


@torch.compiler.disable
def _moba(q_THd, k_TKd, v_TKd, cu_seqlens_N, block_size: int, topk: int) -> torch.Tensor:
    # Outside any compiled graph: the reference walks the sequences in Python (`.tolist()`), and
    # the CUDA kernels are launched as they are, with their own bookkeeping; a compiled block
    # breaks its graph here.
    # Autocast off: q, k, v keep the dtype they come in (bf16 under mixed precision), and the
    # op computes the gate in fp32 as specified rather than autocast's bf16 einsum.
    with torch.autocast(q_THd.device.type, enabled=False):
        return moba_attention(q_THd, k_TKd, v_TKd, cu_seqlens_N, block_size, topk)


class MobaAttention:
    """MoBA over the batch's sequences (../shared/specs/moba.md), which it reads packed."""

    def __init__(self, block_size: int, topk: int):
        self.block_size = block_size
        self.topk = topk

    def __call__(self, q_BSHd: torch.Tensor, k_BSKd: torch.Tensor, v_BSKd: torch.Tensor, seq: SequenceInfo):
        B, S, H, d = q_BSHd.shape
        K = k_BSKd.shape[2]
        # MoBA reads shared K/V heads itself (no repeat).
        o_THd = _moba(
            q_BSHd.reshape(B * S, H, d),
            k_BSKd.reshape(B * S, K, d),
            v_BSKd.reshape(B * S, K, d),
            seq.cu_seqlens_N,
            self.block_size,
            self.topk,
        )
        return o_THd.view(B, S, H, d)

    def __repr__(self) -> str:
        return f"MobaAttention(block_size={self.block_size}, topk={self.topk})"


def attention_op(attn_cfg: AttentionConfig, layer_id: int, n_layers: int) -> AttentionOp:
    """The op layer `layer_id` of `n_layers` runs: MoBA where the config says, else full attention."""
    if attn_cfg.uses_moba(layer_id, n_layers):
        return MobaAttention(attn_cfg.moba_block_size, attn_cfg.moba_topk)
    return full_attention
