"""MoBA dk and dv in Triton: every query that reads a key block, split so that no block serializes.

A key block's readers are its own later queries (causal) and the gathered queries that chose it
(layout.GatherLists). A block chosen by most queries (an attention sink, typically the first)
would make its one program walk nearly every query. So its routed queries are cut into chunks
of a fixed length (layout.KeyBlockChunks, `dkdv_chunk_rows`):
1. `_bwd_dkdv_chunk_kernel`: one program per (chunk past a block's first, key tile) writes the
   chunk's fp32 partial dk and dv;
2. `_bwd_dkdv_kernel`: one program per (block, key tile, KV head) sums its own queries and the
   first chunk in registers, then adds the block's partials in chunk order and writes dk, dv.
No atomics and a fixed summation order: bitwise the same run to run.

The chunk is `split` x the mean routed rows of a (block, KV head), G K1 B, so the partials of a
whole call, at most E / chunk of [B, D] pairs, cost 8 T Hkv D / split bytes (2 bytes per element
of k at split 4, as much as k in bf16), whatever the routing; and the longest program reads at
most `split` x the mean of routed queries besides its own block.

Shape legend: T tokens (of q; k and v may hold more, see layout.BlockLayout), Hq/Hkv heads,
G = Hq / Hkv, D head dim, B block size, NB blocks (bound), K1 routed slots, E = T Hq K1 routed
entries, P partials (bound).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import BlockLayout, GatherLists, KeyBlockChunks, key_block_chunks
from .tiles import LaunchTiles, grad_rows, load_rows, store_rows


def dkdv_chunk_rows(tiles: LaunchTiles, groups: int, k1: int, block_size: int) -> int:
    """Routed rows per dk/dv program: `split` x the mean per (block, KV head), whole tiles."""
    return triton.cdiv(tiles.split * groups * max(k1, 1) * block_size, tiles.block_m) * tiles.block_m


@triton.jit
def _dkdv_from_queries(
    k, v, dk, dv, u, t, t_ok, h, q_ptr, do_ptr, lse_ptr, delta_ptr, stride_qt, stride_qh, HQ, D, qk_scale,
    CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Add the contribution of query rows t (head h) to the key tile's dk and dv; if CAUSAL, only
    of the queries at or after each key, u being the keys' positions minus the queries' shift."""
    q, do, lse, delta = grad_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, t, h, stride_qt, stride_qh, t_ok, HQ, D, BLOCK_D)
    # Transposed scores [keys, queries], so that dk and dv come out as plain products.
    s_T = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
    ok = t_ok[None, :]
    if CAUSAL:
        ok = ok & (u[:, None] <= t[None, :])
    p_T = tl.where(ok, tl.exp2(s_T - lse[None, :]), 0.0)
    dv += tl.dot(p_T.to(do.dtype), do, input_precision=PRECISION)
    dp_T = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_T = p_T * (dp_T - delta[None, :])
    dk += tl.dot(ds_T.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_from_routed(
    k, v, dk, dv, u, g, hk, lo, hi, tokens_ptr, list_begin_ptr, list_end_ptr,
    q_ptr, do_ptr, lse_ptr, delta_ptr, stride_qt, stride_qh, NB, HQ, K1, D, qk_scale,
    GROUPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Add rows [lo, hi) (int64) of block g's routed queries at KV head hk: its lists for the
    group's heads and every slot, end to end in (head, slot) order."""
    base = lo * 0
    for i in range(GROUPS):
        h = hk * GROUPS + i
        for slot in range(K1):
            lst = (slot * HQ + h.to(tl.int64)) * NB + g
            begin = tl.load(list_begin_ptr + lst)
            n = tl.load(list_end_ptr + lst) - begin
            # This list's share of [lo, hi), as positions in tokens_E (empty when it lies outside).
            first = begin + tl.maximum(lo - base, 0)
            last = begin + tl.minimum(hi - base, n)
            for r0 in range(first, last, BLOCK_M):
                rows = r0 + tl.arange(0, BLOCK_M)
                rows_ok = rows < last
                t = tl.load(tokens_ptr + rows, mask=rows_ok, other=0).to(tl.int64)
                dk, dv = _dkdv_from_queries(
                    k, v, dk, dv, u, t, rows_ok, h, q_ptr, do_ptr, lse_ptr, delta_ptr, stride_qt, stride_qh, HQ,
                    D, qk_scale, False, BLOCK_D, PRECISION,
                )  # fmt: skip
            base += n
    return dk, dv


@triton.jit
def _key_tile(
    k_ptr, v_ptr, start_ptr, end_ptr, g, hk, stride_kt, stride_kh, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr
):
    """Key tile program_id(1) of block g: its start, keys u (int64), which are real, and k, v."""
    start = tl.load(start_ptr + g)
    end = tl.load(end_ptr + g)
    u = tl.arange(0, BLOCK_N).to(tl.int64) + start + tl.program_id(1) * BLOCK_N
    u_ok = u < end
    k = load_rows(k_ptr, u, hk, stride_kt, stride_kh, u_ok, D, BLOCK_D)
    v = load_rows(v_ptr, u, hk, stride_kt, stride_kh, u_ok, D, BLOCK_D)
    return start, end, u, u_ok, k, v


@triton.jit
def _bwd_dkdv_chunk_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, part_dk_ptr, part_dv_ptr,
    tokens_ptr, list_begin_ptr, list_end_ptr, part_first_ptr, owner_ptr, index_ptr, start_ptr, end_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh,
    NB, HQ, HKV, K1, D, B, CHUNK_ROWS, qk_scale,
    GROUPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    p = tl.program_id(0).to(tl.int64)
    if p >= tl.load(part_first_ptr + NB * HKV):
        return
    w = tl.load(owner_ptr + p)
    g = w // HKV
    hk = (w % HKV).to(tl.int32)
    start, end, u, u_ok, k, v = _key_tile(
        k_ptr, v_ptr, start_ptr, end_ptr, g, hk, stride_kt, stride_kh, D, BLOCK_N, BLOCK_D
    )
    if start + tl.program_id(1) * BLOCK_N >= end:
        return
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo = tl.load(index_ptr + p) * CHUNK_ROWS
    dk, dv = _dkdv_from_routed(
        k, v, dk, dv, u, g, hk, lo, lo + CHUNK_ROWS, tokens_ptr, list_begin_ptr, list_end_ptr,
        q_ptr, do_ptr, lse_ptr, delta_ptr, stride_qt, stride_qh, NB, HQ, K1, D, qk_scale,
        GROUPS, BLOCK_M, BLOCK_D, PRECISION,
    )  # fmt: skip
    # Partial p holds [B, D]: row u - start of the block.
    store_rows(part_dk_ptr, dk, u - start, p, D, B * D, u_ok, D, BLOCK_D)
    store_rows(part_dv_ptr, dv, u - start, p, D, B * D, u_ok, D, BLOCK_D)


@triton.jit
def _bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, part_dk_ptr, part_dv_ptr,
    tokens_ptr, list_begin_ptr, list_end_ptr, part_first_ptr, start_ptr, end_ptr, qstart_ptr, qend_ptr, shift_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh,
    NB, HQ, HKV, K1, D, B, CHUNK_ROWS, qk_scale, sm_scale,
    GROUPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    g = tl.program_id(0)
    hk = tl.program_id(2)
    start, end, u, u_ok, k, v = _key_tile(
        k_ptr, v_ptr, start_ptr, end_ptr, g, hk, stride_kt, stride_kh, D, BLOCK_N, BLOCK_D
    )
    key_lo = start + tl.program_id(1) * BLOCK_N
    if key_lo >= end:
        return
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # The block's own queries (rows sitting at key row + shift) at or after the tile's first key.
    qend = tl.load(qend_ptr + g)
    shift = tl.load(shift_ptr + g)
    q_lo = tl.maximum(key_lo - shift, tl.load(qstart_ptr + g))
    for i in range(GROUPS):
        for m0 in range(q_lo, qend, BLOCK_M):
            t = tl.arange(0, BLOCK_M).to(tl.int64) + m0
            dk, dv = _dkdv_from_queries(
                k, v, dk, dv, u - shift, t, t < qend, hk * GROUPS + i, q_ptr, do_ptr, lse_ptr, delta_ptr,
                stride_qt, stride_qh, HQ, D, qk_scale, True, BLOCK_D, PRECISION,
            )  # fmt: skip
    lo = tl.full([], 0, tl.int64)
    dk, dv = _dkdv_from_routed(
        k, v, dk, dv, u, g, hk, lo, lo + CHUNK_ROWS, tokens_ptr, list_begin_ptr, list_end_ptr,
        q_ptr, do_ptr, lse_ptr, delta_ptr, stride_qt, stride_qh, NB, HQ, K1, D, qk_scale,
        GROUPS, BLOCK_M, BLOCK_D, PRECISION,
    )  # fmt: skip
    # The block's later chunks, in chunk order.
    w = g.to(tl.int64) * HKV + hk
    for p in range(tl.load(part_first_ptr + w), tl.load(part_first_ptr + w + 1)):
        dk += load_rows(part_dk_ptr, u - start, p, D, B * D, u_ok, D, BLOCK_D)
        dv += load_rows(part_dv_ptr, u - start, p, D, B * D, u_ok, D, BLOCK_D)
    store_rows(dk_ptr, dk * sm_scale, u, hk, stride_kt, stride_kh, u_ok, D, BLOCK_D)
    store_rows(dv_ptr, dv, u, hk, stride_kt, stride_kh, u_ok, D, BLOCK_D)


def dkdv_bwd(
    do_THD: torch.Tensor,
    q_THD: torch.Tensor,
    k_THD: torch.Tensor,
    v_THD: torch.Tensor,
    lse_TH: torch.Tensor,
    delta_TH: torch.Tensor,
    layout: BlockLayout,
    lists: GatherLists,
    K1: int,
    block_size: int,
    tiles: LaunchTiles,
    sizes: dict,
    strides: tuple[int, ...],
    qk_scale: float,
    sm_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dk, dv [T, Hkv, D] in k's dtype, from do, q, the forward's lse and delta = do . o
    (`sizes`: moba_bwd's constexprs, `strides`: of q and k along tokens and heads)."""
    T, Hq, D = q_THD.shape
    Hkv = k_THD.shape[1]
    NB = layout.n_blocks
    rows = dkdv_chunk_rows(tiles, Hq // Hkv, K1, block_size)
    chunks: KeyBlockChunks = key_block_chunks(lists, K1, Hq, Hkv, NB, rows)
    part_dk_PBD, part_dv_PBD = (
        torch.empty(max(chunks.n_partials, 1), block_size, D, dtype=torch.float32, device=q_THD.device)
        for _ in range(2)
    )
    key_tiles = triton.cdiv(block_size, tiles.block_n)
    if chunks.n_partials:
        _bwd_dkdv_chunk_kernel[(chunks.n_partials, key_tiles)](
            q_THD, k_THD, v_THD, do_THD, lse_TH, delta_TH, part_dk_PBD, part_dv_PBD,
            lists.tokens_E, lists.list_begin_L, lists.list_end_L, chunks.first_W, chunks.owner_P, chunks.index_P,
            layout.start_NB, layout.end_NB, *strides,
            NB, Hq, Hkv, K1, D, block_size, rows, qk_scale, **sizes, num_warps=tiles.warps,
        )  # fmt: skip
    dk_THD = torch.empty_like(k_THD)
    dv_THD = torch.empty_like(v_THD)
    _bwd_dkdv_kernel[(NB, key_tiles, Hkv)](
        q_THD, k_THD, v_THD, do_THD, lse_TH, delta_TH, dk_THD, dv_THD, part_dk_PBD, part_dv_PBD,
        lists.tokens_E, lists.list_begin_L, lists.list_end_L, chunks.first_W, layout.start_NB, layout.end_NB,
        layout.qstart_NB, layout.qend_NB, layout.shift_NB,
        *strides, NB, Hq, Hkv, K1, D, block_size, rows, qk_scale, sm_scale, **sizes, num_warps=tiles.warps,
    )  # fmt: skip
    return dk_THD, dv_THD
