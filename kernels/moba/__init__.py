"""MoBA (Mixture of Block Attention): see ../shared/specs/moba.md for the exact function.

Shape legend: T packed tokens, Hq query heads, Hkv key/value heads, D head dim.

Today `moba_attention` runs the reference on every device; the Triton kernels (forward and
backward, routed without materializing the gate) are still to come.
"""

from __future__ import annotations

import torch

from .reference import moba_reference, moba_selection

__all__ = ["moba_attention", "moba_reference", "moba_selection"]


def moba_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, block_size: int, topk: int
) -> torch.Tensor:
    """Differentiable MoBA: q [T, Hq, D], k and v [T, Hkv, D], cu_seqlens [S+1] int32 -> o [T, Hq, D].

    Each query attends causally to its current block and the top-K-1 fully past blocks of its
    sequence chosen by q . mean(k of the block); `topk` counts the current block.
    """
    return moba_reference(q, k, v, cu_seqlens, block_size, topk)
