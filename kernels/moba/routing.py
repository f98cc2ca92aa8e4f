"""MoBA routing in Triton: block mean keys, then each query's top K - 1 fully past blocks.

Spec steps 2-5 (../shared/specs/moba.md): kbar_j is the fp32 mean key of block j, the gate is
q_t . kbar_j in fp32 (no scale), and each query keeps its current block plus the K - 1 best
fully past blocks of its sequence. The gate is streamed: a program holds the gates of one
tile of queries against one chunk of candidate blocks at a time, so the [n_blocks, H, T]
tensor never exists, and merges each chunk into a running top K - 1 kept in registers. The
order is (gate descending, block number ascending), which also breaks exact ties
deterministically. Each gate is computed once, in fp32 products (not tf32).

Shape legend: T tokens (of q; k and v may hold more, see layout.BlockLayout), Hq/Hkv query/key-value
heads, D head dim, NB blocks (bound), K1 = K - 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import BlockLayout
from .tiles import LaunchTiles, block_query_rows, load_rows


@triton.jit
def _block_means_kernel(
    k_ptr,
    kbar_ptr,
    start_ptr,
    end_ptr,
    stride_kt,
    stride_kh,
    stride_bn,
    stride_bh,
    D,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    g = tl.program_id(0)
    hk = tl.program_id(1)
    start = tl.load(start_ptr + g)
    end = tl.load(end_ptr + g)
    if end <= start:
        return
    d = tl.arange(0, BLOCK_D)
    sum_D = tl.zeros([BLOCK_D], dtype=tl.float32)
    for r0 in range(start, end, ROWS):
        rows = tl.arange(0, ROWS).to(tl.int64) + r0
        k = load_rows(k_ptr, rows, hk, stride_kt, stride_kh, rows < end, D, BLOCK_D)
        sum_D += tl.sum(k.to(tl.float32), axis=0)
    out = kbar_ptr + g.to(tl.int64) * stride_bn + hk * stride_bh + d
    tl.store(out, sum_D / (end - start).to(tl.float32), mask=d < D)


@triton.jit
def _route_kernel(
    q_ptr,
    kbar_ptr,
    sel_ptr,
    qblock_ptr,
    start_ptr,
    end_ptr,
    first_ptr,
    qstart_ptr,
    qend_ptr,
    shift_ptr,
    stride_qt,
    stride_qh,
    stride_bn,
    stride_bh,
    stride_st,
    stride_sh,
    D,
    K1: tl.constexpr,
    K1_PAD: tl.constexpr,
    GROUPS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    h = tl.program_id(2)
    g, _, _, q0, qend, t, t_ok, _ = block_query_rows(
        qblock_ptr, start_ptr, end_ptr, qstart_ptr, qend_ptr, shift_ptr, BLOCK_M
    )
    if q0 >= qend:
        return
    first = tl.load(first_ptr + g)
    hk = h // GROUPS
    q = load_rows(q_ptr, t, h, stride_qt, stride_qh, t_ok, D, BLOCK_D).to(tl.float32)
    NONE: tl.constexpr = 2147483647
    slot = tl.arange(0, K1_PAD)
    # The best K1 blocks so far, by (gate descending, block number ascending); -inf marks none.
    kept_s = tl.full([BLOCK_M, K1_PAD], float("-inf"), tl.float32)
    kept_j = tl.full([BLOCK_M, K1_PAD], NONE, tl.int32)
    # Candidates: the fully past blocks of this sequence, first .. g - 1, the same for every
    # query of block g.
    for c0 in range(first, g, CHUNK):
        c = c0 + tl.arange(0, CHUNK)
        c_ok = c < g
        kbar = load_rows(kbar_ptr, c.to(tl.int64), hk, stride_bn, stride_bh, c_ok, D, BLOCK_D)
        gate = tl.dot(q, tl.trans(kbar), input_precision="ieee")
        gate = tl.where(c_ok[None, :], gate, float("-inf"))
        # Merge: take the best of chunk and kept list K1 times, removing each pick from its side.
        merged_s = tl.full([BLOCK_M, K1_PAD], float("-inf"), tl.float32)
        merged_j = tl.full([BLOCK_M, K1_PAD], NONE, tl.int32)
        for r in tl.static_range(K1):
            top = tl.max(gate, axis=1)
            top_j = tl.min(tl.where(gate == top[:, None], c[None, :], NONE), axis=1)
            kept_top = tl.max(kept_s, axis=1)
            kept_top_j = tl.min(tl.where(kept_s == kept_top[:, None], kept_j, NONE), axis=1)
            from_chunk = (top > kept_top) | ((top == kept_top) & (top_j < kept_top_j))
            pick_s = tl.where(from_chunk, top, kept_top)
            pick_j = tl.where(from_chunk, top_j, kept_top_j)
            merged_s = tl.where(slot[None, :] == r, pick_s[:, None], merged_s)
            merged_j = tl.where(slot[None, :] == r, pick_j[:, None], merged_j)
            gate = tl.where(c[None, :] == pick_j[:, None], float("-inf"), gate)
            kept_s = tl.where(kept_j == pick_j[:, None], float("-inf"), kept_s)
        kept_s = merged_s
        kept_j = merged_j
    # Gates of real blocks are finite: a -inf pick is a slot left empty.
    sel = tl.where(kept_s > float("-inf"), kept_j, -1)
    sel_ptrs = sel_ptr + t[:, None] * stride_st + h * stride_sh + slot[None, :]
    tl.store(sel_ptrs, sel, mask=t_ok[:, None] & (slot[None, :] < K1))


def route(
    q_THD: torch.Tensor, k_THD: torch.Tensor, layout: BlockLayout, block_size: int, k1: int, tiles: LaunchTiles
) -> torch.Tensor:
    """The routed blocks of every query: int32 [T, Hq, K1], global key block numbers, -1 for none.

    Block means cover every key block; the routing runs over the query blocks only."""
    T, Hq, D = q_THD.shape
    Hkv = k_THD.shape[1]
    NB = layout.n_blocks
    BLOCK_D = triton.next_power_of_2(max(D, 16))
    kbar_NHD = torch.empty(NB, Hkv, D, dtype=torch.float32, device=q_THD.device)
    _block_means_kernel[(NB, Hkv)](
        k_THD,
        kbar_NHD,
        layout.start_NB,
        layout.end_NB,
        k_THD.stride(0),
        k_THD.stride(1),
        kbar_NHD.stride(0),
        kbar_NHD.stride(1),
        D,
        ROWS=tiles.rows,
        BLOCK_D=BLOCK_D,
    )
    sel_THK = torch.empty(T, Hq, k1, dtype=torch.int32, device=q_THD.device)
    grid = (layout.n_query_blocks, triton.cdiv(block_size, tiles.block_m), Hq)
    _route_kernel[grid](
        q_THD,
        kbar_NHD,
        sel_THK,
        layout.qblock_P,
        layout.start_NB,
        layout.end_NB,
        layout.first_NB,
        layout.qstart_NB,
        layout.qend_NB,
        layout.shift_NB,
        q_THD.stride(0),
        q_THD.stride(1),
        kbar_NHD.stride(0),
        kbar_NHD.stride(1),
        sel_THK.stride(0),
        sel_THK.stride(1),
        D,
        K1=k1,
        K1_PAD=triton.next_power_of_2(k1),
        GROUPS=Hq // Hkv,
        BLOCK_M=tiles.block_m,
        CHUNK=tiles.chunk,
        BLOCK_D=BLOCK_D,
        num_warps=tiles.warps,
    )
    return sel_THK
