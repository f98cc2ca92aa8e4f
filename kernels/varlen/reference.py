"""Document-masked causal attention written plainly: the oracle for `varlen_attention`.

Shape legend: B rows, S positions per row, H query heads, K key/value heads, d head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def document_causal_mask(doc_ids_BS: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, S, S]: query i may see key j iff j <= i and both lie in the same document.

    A document is a run of equal ids in a row; the diagonal is always allowed, so no query row
    is empty and softmax never sees all -inf.
    """
    S = doc_ids_BS.shape[1]
    causal_SS = torch.ones(S, S, dtype=torch.bool, device=doc_ids_BS.device).tril()
    same_doc_BSS = doc_ids_BS.unsqueeze(2) == doc_ids_BS.unsqueeze(1)
    return (same_doc_BSS & causal_SS).unsqueeze(1)


def document_attention_reference(
    q_BSHd: torch.Tensor, k_BSKd: torch.Tensor, v_BSKd: torch.Tensor, doc_ids_BS: torch.Tensor
) -> torch.Tensor:
    """Causal attention within each document: o [B, S, H, d].

    A dense [B, 1, S, S] mask through SDPA, with the K/V heads repeated: the kernels that take a
    mask reject enable_gqa. O(S^2) memory per row: for the CPU and for tests, not for long
    sequences on a GPU (~2 GiB of mask per row at 32K).
    """
    groups = q_BSHd.shape[2] // k_BSKd.shape[2]
    q_BHSd, k_BKSd, v_BKSd = (t.transpose(1, 2) for t in (q_BSHd, k_BSKd, v_BSKd))
    if groups > 1:
        k_BKSd = k_BKSd.repeat_interleave(groups, dim=1)
        v_BKSd = v_BKSd.repeat_interleave(groups, dim=1)
    o_BHSd = F.scaled_dot_product_attention(q_BHSd, k_BKSd, v_BKSd, attn_mask=document_causal_mask(doc_ids_BS))
    return o_BHSd.transpose(1, 2)
