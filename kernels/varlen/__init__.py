"""Causal attention over packed documents (variable-length sequences).

Shape legend: B rows, S positions per row, T = B * S tokens, H query heads, K key/value
heads, d head dim, N sequences.

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
    q_BSHd: torch.Tensor,
    k_BSKd: torch.Tensor,
    v_BSKd: torch.Tensor,
    doc_ids_BS: torch.Tensor,
    cu_seqlens_N: torch.Tensor,
    max_seqlen: int,
) -> torch.Tensor:
    """Causal attention within each document: o [B, S, H, d] in q's dtype.

    q [B, S, H, d], k and v [B, S, K, d] (H a multiple of K); `doc_ids_BS` marks the documents
    (runs of equal ids in a row); `cu_seqlens_N` (int32 [N + 1]) and `max_seqlen` describe the
    same documents in the flattened batch (`model.sequence.SequenceInfo` computes all three once
    per batch). The flash path reads cu_seqlens and max_seqlen, the reference doc_ids.
    """
    B, S, H, d = q_BSHd.shape
    if k_BSKd.shape[:2] != (B, S) or k_BSKd.shape != v_BSKd.shape or H % k_BSKd.shape[2]:
        raise ValueError(
            f"q {tuple(q_BSHd.shape)} needs k and v of shape [B, S, K, d] with K dividing H; "
            f"got {tuple(k_BSKd.shape)} and {tuple(v_BSKd.shape)}"
        )
    if not flash_varlen_available(q_BSHd.device.type, q_BSHd.dtype):
        return document_attention_reference(q_BSHd, k_BSKd, v_BSKd, doc_ids_BS)
    from torch.nn.attention.varlen import varlen_attn

    causal, reads_gqa = _signature(varlen_attn)
    K = k_BSKd.shape[2]
    gqa = {}
    if H != K and reads_gqa:
        gqa = {"enable_gqa": True}
    elif H != K:  # an older torch: the shared heads are repeated (memory, not correctness)
        k_BSKd, v_BSKd = (t.repeat_interleave(H // K, dim=2) for t in (k_BSKd, v_BSKd))
        K = H
    o_THd = varlen_attn(
        q_BSHd.reshape(B * S, H, d),
        k_BSKd.reshape(B * S, K, d),
        v_BSKd.reshape(B * S, K, d),
        cu_seqlens_N,
        cu_seqlens_N,
        max_seqlen,
        max_seqlen,
        **causal,
        **gqa,
    )
    return o_THd.view(B, S, H, d)
