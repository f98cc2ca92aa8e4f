"""Document-masked causal attention written plainly: the oracle for `varlen_attention`.

Shape legend: B rows, Q query positions and U key positions per row, H query heads, K key/value heads, d head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def document_causal_mask(doc_ids_BU: torch.Tensor | None, n_queries: int | None = None, n_keys: int | None = None):
    """Boolean [B or 1, 1, Q, U]: query i, the key position U - Q + i, may see key j iff j <= U - Q + i
    and both lie in the same document.

    The queries are the last Q = `n_queries` of the U keys (all of them by default; bottom-right
    alignment, as FlashAttention's varlen kernel takes queries shorter than keys). A document is
    a run of equal ids in a row; without `doc_ids_BU` (give `n_keys`) each row is one sequence.
    The diagonal is always allowed, so no query row is empty and softmax never sees all -inf.
    """
    U = doc_ids_BU.shape[1] if doc_ids_BU is not None else n_keys
    Q = U if n_queries is None else n_queries
    device = doc_ids_BU.device if doc_ids_BU is not None else None
    causal_QU = torch.ones(Q, U, dtype=torch.bool, device=device).tril(diagonal=U - Q)
    if doc_ids_BU is None:
        return causal_QU.view(1, 1, Q, U)
    same_doc_BQU = doc_ids_BU[:, U - Q :].unsqueeze(2) == doc_ids_BU.unsqueeze(1)
    return (same_doc_BQU & causal_QU).unsqueeze(1)


def document_attention_reference(
    q_BQHd: torch.Tensor, k_BUKd: torch.Tensor, v_BUKd: torch.Tensor, doc_ids_BU: torch.Tensor | None
) -> torch.Tensor:
    """Causal attention within each document: o [B, Q, H, d].

    q [B, Q, H, d] are the last Q positions of the U keys k, v [B, U, K, d] (Q = U: the whole
    sequence); `doc_ids_BU` marks the keys' documents (None: each row is one sequence). A dense
    [B, 1, Q, U] mask through SDPA, with the K/V heads repeated: the kernels that take a mask
    reject enable_gqa. O(Q U) memory per row: for the CPU and for tests, not for long sequences
    on a GPU (~2 GiB of mask per row at 32K).
    """
    groups = q_BQHd.shape[2] // k_BUKd.shape[2]
    q_BHQd, k_BKUd, v_BKUd = (t.transpose(1, 2) for t in (q_BQHd, k_BUKd, v_BUKd))
    if groups > 1:
        k_BKUd = k_BKUd.repeat_interleave(groups, dim=1)
        v_BKUd = v_BKUd.repeat_interleave(groups, dim=1)
    mask = document_causal_mask(doc_ids_BU, q_BQHd.shape[1], k_BUKd.shape[1])
    o_BHQd = F.scaled_dot_product_attention(q_BHQd, k_BKUd, v_BKUd, attn_mask=mask)
    return o_BHQd.transpose(1, 2)
