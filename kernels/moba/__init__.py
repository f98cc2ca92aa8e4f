"""MoBA (Mixture of Block Attention): see ../shared/specs/moba.md for the exact function.

Shape legend: T (Tq, Tk) query (key) tokens, Hq query heads, Hkv key/value heads, D head dim, K1 = topk - 1.

`moba_attention` runs the Triton kernels on CUDA (routing.py, forward.py, backward.py; the
index bookkeeping in layout.py) and the pure-torch reference elsewhere. `moba_triton` calls
the kernels directly; under TRITON_INTERPRET=1 they also run on CPU tensors (fp32), which is
how the CPU tests check them against the reference.
"""

from __future__ import annotations

import torch

from .reference import moba_reference, moba_selection

__all__ = ["moba_attention", "moba_reference", "moba_selection", "moba_triton"]

MAX_HEAD_DIM = 256


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    block_size: int,
    topk: int,
    cu_seqlens_k: torch.Tensor | None,
) -> None:
    """Shape, dtype and device checks that need no look at the data (no host synchronization)."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"MoBA takes packed q [Tq, Hq, D], k and v [Tk, Hkv, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if k.shape != v.shape or k.shape[2] != q.shape[2]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [Tk, Hkv, D] for q {tuple(q.shape)}")
    if cu_seqlens_k is None and k.shape[0] != q.shape[0]:
        raise ValueError(
            f"k has {k.shape[0]} tokens and q {q.shape[0]}: keys of another length need cu_seqlens_k to split them"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of key/value heads {k.shape[1]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must share a device, got {q.device}, {k.device}, {v.device}")
    for name, cu in (("cu_seqlens", cu_seqlens), ("cu_seqlens_k", cu_seqlens_k)):
        if cu is None:
            continue
        if cu.dim() != 1 or cu.numel() < 2 or cu.dtype != torch.int32:
            raise ValueError(f"{name} must be a 1-D int32 tensor [S + 1], got {cu.dtype} {tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device}, q on {q.device}")
    if cu_seqlens_k is not None and cu_seqlens_k.shape != cu_seqlens.shape:
        raise ValueError(
            f"cu_seqlens_k {tuple(cu_seqlens_k.shape)} must split k into as many sequences as cu_seqlens "
            f"{tuple(cu_seqlens.shape)} splits q"
        )
    if block_size < 1 or topk < 1:
        raise ValueError(f"MoBA needs block_size >= 1 and topk >= 1, got {block_size} and {topk}")
    if q.shape[2] > MAX_HEAD_DIM:
        raise ValueError(
            f"the MoBA kernels take head dims up to {MAX_HEAD_DIM} (a tile row in registers), got {q.shape[2]}"
        )


class _MobaFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, block_size, topk, cu_seqlens_k):
        # Imported here so that CPU-only users never load triton.
        from .forward import moba_fwd
        from .layout import block_layout, gather_lists
        from .routing import route
        from .tiles import launch_tiles

        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        T, Hq, _ = q.shape
        tiles = launch_tiles(q)
        if cu_seqlens_k is None:
            layout = block_layout(cu_seqlens, T, block_size)
        else:
            layout = block_layout(cu_seqlens_k, k.shape[0], block_size, cu_seqlens, T)
        # No query has more than max_blocks_per_seq - 1 fully past blocks: slots past that stay empty.
        k1 = max(min(topk - 1, layout.max_blocks_per_seq - 1), 0)
        if k1:
            sel_THK = route(q, k, layout, block_size, k1, tiles)
        else:
            sel_THK = torch.empty(T, Hq, 0, dtype=torch.int32, device=q.device)
        lists = gather_lists(sel_THK, layout.n_blocks, tiles.block_m)
        o, lse = moba_fwd(q, k, v, layout, sel_THK, lists, block_size, tiles)
        ctx.save_for_backward(q, k, v, o, lse, sel_THK)
        # Index tensors of the op's own making: kept as plain attributes.
        ctx.meta = (layout, lists, block_size, tiles)
        return o

    @staticmethod
    def backward(ctx, do):
        from .backward import moba_bwd

        q, k, v, o, lse, sel_THK = ctx.saved_tensors
        layout, lists, block_size, tiles = ctx.meta
        dq, dk, dv = moba_bwd(do.contiguous(), q, k, v, o, lse, layout, sel_THK, lists, block_size, tiles)
        return dq, dk, dv, None, None, None, None


def moba_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    block_size: int,
    topk: int,
    cu_seqlens_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """MoBA by the Triton kernels, whatever the device (CPU tensors need TRITON_INTERPRET=1)."""
    from .layout import check_index_range
    from .tiles import launch_tiles

    _check_inputs(q, k, v, cu_seqlens, block_size, topk, cu_seqlens_k)
    check_index_range(k.shape[0], cu_seqlens.numel() - 1, q.shape[1], block_size, launch_tiles(q).block_m, q.shape[0])
    if q.shape[0] == 0:
        return moba_reference(q, k, v, cu_seqlens, block_size, topk, cu_seqlens_k)
    return _MobaFunction.apply(q, k, v, cu_seqlens, block_size, topk, cu_seqlens_k)


def moba_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    block_size: int,
    topk: int,
    cu_seqlens_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable MoBA: q [Tq, Hq, D], k and v [Tk, Hkv, D], cu_seqlens [S+1] int32 splitting
    q, cu_seqlens_k [S+1] int32 splitting k (None: the same as cu_seqlens, Tk = Tq) -> o [Tq, Hq, D].

    Each query attends causally to its current block and the top-K-1 fully past blocks of its
    sequence chosen by q . mean(k of the block); `topk` counts the current block. Query head h
    reads key/value head h // (Hq / Hkv). The Lq_s queries of sequence s are the last Lq_s of its
    Lk_s keys (FlashAttention's varlen layout with bottom-right causal alignment; Lq_s may be 0):
    MoBA of the Lk_s keys, its blocks counted from the sequence's first key, and only those
    queries' outputs (and gradients) computed. On CUDA the Triton kernels run without any host
    synchronization (the op can be captured in a CUDA graph), so there `cu_seqlens` and
    `cu_seqlens_k` are trusted: they must rise from 0 to Tq and Tk, with Lq_s <= Lk_s (the
    reference, used elsewhere, checks them).
    """
    if q.is_cuda:
        return moba_triton(q, k, v, cu_seqlens, block_size, topk, cu_seqlens_k)
    return moba_reference(q, k, v, cu_seqlens, block_size, topk, cu_seqlens_k)
