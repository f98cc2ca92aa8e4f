"""Causal attention over packed documents (variable-length sequences).

Shape legend: B rows, Q query positions and U key positions per row (Q = U but under context
parallelism), H query heads, K key/value heads, d head dim, N sequences.

`varlen_attention` runs FlashAttention's variable-length kernel on CUDA in bf16/fp16
(`torch.nn.attention.varlen.varlen_attn`, torch >= 2.10: shared K/V heads are read in place,
no mask is built, memory is linear in S), and the dense-mask reference (`reference.py`)
elsewhere: on the CPU and for fp32, which the flash kernel does not take.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect

import torch

from .reference import document_attention_reference, document_causal_mask

__all__ = ["document_attention_reference", "document_causal_mask", "flash_varlen_available", "varlen_attention"]


def flash_varlen_available(device_type: str, dtype: torch.dtype) -> bool:
    """Whether `varlen_attention` runs the flash kernel for q of `dtype` on `device_type`."""
    if device_type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


@functools.cache
def _signature(varlen_attn) -> tuple[dict, bool]:
    """How this torch's `varlen_attn` is called: (the keyword that makes it causal, whether it
    reads shared K/V heads itself). torch 2.10 and 2.11 take is_causal=True and no enable_gqa;
    later releases take a window of (-1, 0) (every key before the query, none after) and enable_gqa."""
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return causal, "enable_gqa" in params


def varlen_attention(
    q_BQHd: torch.Tensor,
    k_BUKd: torch.Tensor,
    v_BUKd: torch.Tensor,
    doc_ids_BU: torch.Tensor | None,
    cu_seqlens_N: torch.Tensor,
    max_seqlen: int,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
) -> torch.Tensor:
    """Causal attention within each document: o [B, Q, H, d] in q's dtype.

    q [B, Q, H, d], k and v [B, U, K, d] (H a multiple of K). By default Q = U, the whole rows;
    `doc_ids_BU` marks the documents (runs of equal ids in a row); `cu_seqlens_N` (int32 [N + 1])
    and `max_seqlen` describe the same documents in the flattened batch
    (`model.sequence.SequenceInfo` computes all three once per batch).

    Queries shorter than the keys (context parallelism: a chunk of positions against the keys
    before its end) are the last Q positions of every row; `cu_seqlens_N` and `max_seqlen` then
    cut the [B * Q] queries and `cu_seqlens_k`, `max_seqlen_k` the [B * U] keys into the same N
    sequences, each sequence's queries the last of its keys (`model.sequence_shard.QueryChunk`),
    and doc_ids may be None (each row one sequence). The flash path reads the cu_seqlens, the
    reference doc_ids.
    """
    B, Q, H, d = q_BQHd.shape
    U = k_BUKd.shape[1]
    if k_BUKd.shape[0] != B or Q > U or k_BUKd.shape != v_BUKd.shape or H % k_BUKd.shape[2]:
        raise ValueError(
            f"q {tuple(q_BQHd.shape)} needs k and v of shape [B, U >= Q, K, d] with K dividing H; "
            f"got {tuple(k_BUKd.shape)} and {tuple(v_BUKd.shape)}"
        )
    if Q != U and cu_seqlens_k is None:
        raise ValueError(f"{Q} queries against {U} keys need cu_seqlens_k and max_seqlen_k")
    if not flash_varlen_available(q_BQHd.device.type, q_BQHd.dtype):
        return document_attention_reference(q_BQHd, k_BUKd, v_BUKd, doc_ids_BU)
    from torch.nn.attention.varlen import varlen_attn

    causal, reads_gqa = _signature(varlen_attn)
    K = k_BUKd.shape[2]
    gqa = {}
    if H != K and reads_gqa:
        gqa = {"enable_gqa": True}
    elif H != K:  # an older torch: the shared heads are repeated (memory, not correctness)
        k_BUKd, v_BUKd = (t.repeat_interleave(H // K, dim=2) for t in (k_BUKd, v_BUKd))
        K = H
    # FlashAttention aligns a causal mask to the bottom right when a sequence has fewer queries
    # than keys: query i of Q sees keys up to U - Q + i, what the reference computes.
    o_THd = varlen_attn(
        q_BQHd.reshape(B * Q, H, d),
        k_BUKd.reshape(B * U, K, d),
        v_BUKd.reshape(B * U, K, d),
        cu_seqlens_N,
        cu_seqlens_N if cu_seqlens_k is None else cu_seqlens_k,
        max_seqlen,
        max_seqlen if max_seqlen_k is None else max_seqlen_k,
        **causal,
        **gqa,
    )
    return o_THd.view(B, Q, H, d)
