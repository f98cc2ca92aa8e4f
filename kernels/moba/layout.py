"""Index bookkeeping for the MoBA kernels, in torch ops that never synchronize with the host.

Every size here is a static bound computed from shapes alone (never from the contents of
`cu_seqlens` or of the routing), so the whole op can be captured in a CUDA graph; kernels
launched over a bound exit early where the bound is not reached.

Shape legend: T packed tokens (queries Tq and keys Tk where they differ: the routed entries and
the lists hold queries, the blocks cover keys), S sequences, Hq query heads, NB the bound on the
number of key blocks, P that on the blocks holding queries, K1 routed slots per query (topk - 1),
E = T * Hq * K1 routed entries, R = K1 * Hq rows of entries (one per slot and head), J = NB + 1
list bounds per row, L lists, U work tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INT32_MAX = 2**31 - 1


@dataclass
class BlockLayout:
    """Every key block of every packed sequence, numbered globally in key order, and the queries
    that sit in each.

    Block g covers keys [start[g], end[g]); `first[g]` is the number of the first block of its
    sequence, so its fully past blocks are first[g] .. g-1. Its queries are the query rows
    [qstart[g], qend[g]) (empty when none): row t sits at key position t + shift[g] (queries are
    the last Lq of their sequence's Lk keys; without a separate query layout, shift is 0 and
    the queries are the keys' own rows). Numbers past the real count have empty ranges and are
    skipped; every array has NB + 1 entries, the last always such an empty block.

    Kernels that work per query (routing, the current block) run over query blocks: p is key
    block qblock[p], or the empty block NB past the real count. Without a separate query layout
    the query blocks are the key blocks.
    """

    start_NB: torch.Tensor
    end_NB: torch.Tensor
    first_NB: torch.Tensor
    qstart_NB: torch.Tensor
    qend_NB: torch.Tensor
    shift_NB: torch.Tensor
    qblock_P: torch.Tensor
    n_blocks: int
    """NB: a bound on the key block count, from Tk, S and the block size alone."""
    n_query_blocks: int
    """P: a bound on the blocks holding queries, from Tq, Tk, S and the block size alone."""
    max_blocks_per_seq: int
    """A bound on the blocks of one sequence (ceil(Tk / block_size))."""


def n_blocks_bound(n_tokens: int, n_seqs: int, block_size: int) -> int:
    # sum over sequences of ceil(L / B) <= (T + S * (B - 1)) / B.
    return max((n_tokens + n_seqs * (block_size - 1)) // block_size, 1)


def n_query_blocks_bound(n_queries: int, n_seqs: int, block_size: int, n_blocks: int) -> int:
    # Lq consecutive queries starting anywhere in a block span at most (Lq + 2 (B - 1)) / B blocks
    # and at most Lq; they are among the n_blocks key blocks.
    spans = (n_queries + n_seqs * 2 * (block_size - 1)) // block_size
    return max(min(spans, n_queries, n_blocks), 1)


def block_layout(
    cu_seqlens: torch.Tensor,
    n_tokens: int,
    block_size: int,
    cu_seqlens_q: torch.Tensor | None = None,
    n_queries: int = 0,
) -> BlockLayout:
    """The blocks of the keys split by `cu_seqlens` (n_tokens keys), with the queries split by
    `cu_seqlens_q` (n_queries rows), each the suffix of its key sequence; None: the keys' own."""
    S = cu_seqlens.numel() - 1
    NB = n_blocks_bound(n_tokens, S, block_size)
    cu = cu_seqlens.to(torch.int64)
    blocks_S = (cu[1:] - cu[:-1] + block_size - 1) // block_size
    cu_blocks = torch.cat([blocks_S.new_zeros(1), blocks_S.cumsum(0)])
    # One more than the bound: block NB is always empty (the padding query blocks point at it).
    g_NB = torch.arange(NB + 1, device=cu.device)
    seq_NB = (torch.searchsorted(cu_blocks, g_NB, right=True) - 1).clamp(0, max(S - 1, 0))
    first_NB = cu_blocks[seq_NB]
    start_NB = cu[seq_NB] + (g_NB - first_NB) * block_size
    end_NB = torch.minimum(start_NB + block_size, cu[seq_NB + 1])
    real_NB = g_NB < cu_blocks[-1]
    start_NB = torch.where(real_NB, start_NB, 0)
    end_NB = torch.where(real_NB, end_NB, 0)
    start_NB, end_NB = start_NB.to(torch.int32), end_NB.to(torch.int32)
    if cu_seqlens_q is None:
        # The queries are the keys' own rows: the same tensors, nothing more to compute.
        qstart_NB, qend_NB, shift_NB = start_NB, end_NB, torch.zeros_like(start_NB)
        qblock_P, n_query_blocks = g_NB[:NB].to(torch.int32), NB
    else:
        qstart_NB, qend_NB, shift_NB, qblock_P, n_query_blocks = _query_blocks(
            cu, cu_seqlens_q.to(torch.int64), cu_blocks, seq_NB, start_NB, end_NB, n_queries, block_size
        )
    return BlockLayout(
        start_NB=start_NB,
        end_NB=end_NB,
        first_NB=first_NB.to(torch.int32),
        qstart_NB=qstart_NB,
        qend_NB=qend_NB,
        shift_NB=shift_NB,
        qblock_P=qblock_P,
        n_blocks=NB,
        n_query_blocks=n_query_blocks,
        max_blocks_per_seq=-(-n_tokens // block_size),
    )


def _query_blocks(cu_k, cu_q, cu_blocks, seq_NB, start_NB, end_NB, n_queries, block_size):
    """Per key block its query rows and shift; the query blocks (see BlockLayout)."""
    S = cu_k.numel() - 1
    NB = seq_NB.numel() - 1
    # Query row t of sequence s sits at key t + shift_s: its last query is its last key.
    shift_S = cu_k[1:] - cu_q[1:]
    q_lo_S = cu_k[1:] - (cu_q[1:] - cu_q[:-1])  # the first query's key position
    shift_NB = shift_S[seq_NB]
    key_lo_NB = torch.maximum(start_NB, q_lo_S[seq_NB])
    has_NB = key_lo_NB < end_NB
    qstart_NB = torch.where(has_NB, key_lo_NB - shift_NB, 0)
    qend_NB = torch.where(has_NB, end_NB - shift_NB, 0)
    # The blocks of sequence s holding queries: from the first query's block to its last block.
    skipped_S = (q_lo_S - cu_k[:-1]) // block_size
    count_S = torch.where(q_lo_S < cu_k[1:], cu_blocks[1:] - cu_blocks[:-1] - skipped_S, 0)
    cu_count = torch.cat([count_S.new_zeros(1), count_S.cumsum(0)])
    P = n_query_blocks_bound(n_queries, S, block_size, NB)
    p_P = torch.arange(P, device=cu_k.device)
    seq_P = (torch.searchsorted(cu_count, p_P, right=True) - 1).clamp(0, max(S - 1, 0))
    g_P = cu_blocks[seq_P] + skipped_S[seq_P] + p_P - cu_count[seq_P]
    qblock_P = torch.where(p_P < cu_count[-1], g_P, NB)
    return qstart_NB.to(torch.int32), qend_NB.to(torch.int32), shift_NB.to(torch.int32), qblock_P.to(torch.int32), P


@dataclass
class GatherLists:
    """For each (slot s, query head h, block j), the queries that chose j in slot s, in query order.

    List l = (s * Hq + h) * NB + j occupies tokens_E[list_begin[l] : list_end[l]]: the query
    tokens of its entries (an entry is one routed slot of one (query, head)). Lists are cut
    into tiles of `tile_rows` entries: tile u belongs to list tile_list[u] and starts at
    tokens_E[tile_row0[u]]. Slot s owns tiles slot_tile_start[s] .. slot_tile_start[s + 1] - 1,
    at most `tiles_per_slot`.

    Positions in tokens_E and list numbers reach T * Hq * K1 and K1 * Hq * NB, past int32 at
    long contexts (4M tokens x 64 heads x 8 slots = 2^31), so they are int64; a token fits
    int32 (cu_seqlens is int32). Within one slot a (query, head) appears at most once, so
    kernels launched slot by slot can update per-query accumulators without races, in a fixed
    order.
    """

    tokens_E: torch.Tensor
    list_begin_L: torch.Tensor
    list_end_L: torch.Tensor
    tile_list_U: torch.Tensor
    tile_row0_U: torch.Tensor
    slot_tile_start: torch.Tensor
    tiles_per_slot: int


def tiles_per_slot(n_tokens: int, n_heads: int, n_blocks: int, tile_rows: int) -> int:
    """A bound on one slot's work tiles (n_tokens queries): each list's tiles hold at most
    tile_rows - 1 unused rows, and a (slot, head) has at most min(n_blocks, n_tokens) lists in use."""
    return -(-n_tokens * n_heads // tile_rows) + n_heads * min(n_blocks, n_tokens)


def check_index_range(
    n_tokens: int, n_seqs: int, n_heads: int, block_size: int, tile_rows: int, n_queries: int | None = None
) -> None:
    """Refuse, from shapes alone, what the kernels' int32 quantities cannot hold (n_tokens keys,
    n_queries queries: the same when None).

    Tokens and block bounds are int32 and a tile's rows run up to block_size past a block's
    start; a slot's work tiles are one launch grid, whose first axis CUDA caps at 2^31 - 1.
    Everything that grows with tokens x heads x slots is int64 and needs no check.
    """
    if n_tokens + block_size > INT32_MAX:
        raise ValueError(
            f"MoBA kernels index tokens in int32: {n_tokens} tokens + block size {block_size} "
            f"= {n_tokens + block_size} > 2^31 - 1"
        )
    n_queries = n_tokens if n_queries is None else n_queries
    tiles = tiles_per_slot(n_queries, n_heads, n_blocks_bound(n_tokens, n_seqs, block_size), tile_rows)
    if tiles > INT32_MAX:
        raise ValueError(
            f"MoBA launches one program per work tile of a slot: {n_queries} tokens x {n_heads} heads in tiles of "
            f"{tile_rows} ({n_tokens} keys, block size {block_size}, {n_seqs} sequences) need {tiles} programs "
            "> 2^31 - 1"
        )


def gather_lists(sel_THK: torch.Tensor, n_blocks: int, tile_rows: int) -> GatherLists:
    """Group the routed picks `sel_THK` (block number, or -1 for none) by (slot, head, block)."""
    T, Hq, K1 = sel_THK.shape
    device = sel_THK.device
    n_lists = K1 * Hq * n_blocks
    per_slot = tiles_per_slot(T, Hq, n_blocks, tile_rows)
    if K1 == 0:
        nothing = torch.zeros(1, dtype=torch.int64, device=device)
        return GatherLists(nothing.int(), nothing, nothing, nothing, nothing, nothing, 0)
    # One row per (slot, head) of T keys, the block number (unused slots sort past every block):
    # torch's CUDA sort refuses a dimension over 2^31 - 1, which T * Hq * K1 passes at long
    # contexts. A slot at a time keeps the sort's scratch (int32 keys, int64 indices) to T * Hq.
    tokens_E = torch.empty(K1 * Hq * T, dtype=torch.int32, device=device)
    bounds_RJ = torch.empty(K1 * Hq, n_blocks + 1, dtype=torch.int64, device=device)
    j_HJ = torch.arange(n_blocks + 1, dtype=sel_THK.dtype, device=device).expand(Hq, n_blocks + 1).contiguous()
    for s in range(K1):
        key_HT = torch.where(sel_THK[:, :, s] >= 0, sel_THK[:, :, s], n_blocks).T.contiguous()
        # A stable sort keeps each list in query order; the index within a row is the query token.
        key_sorted_HT, tokens_HT = torch.sort(key_HT, dim=1, stable=True)
        tokens_E[s * Hq * T : (s + 1) * Hq * T] = tokens_HT.flatten()
        row0_H1 = torch.arange(s * Hq, (s + 1) * Hq, device=device).view(Hq, 1) * T
        bounds_RJ[s * Hq : (s + 1) * Hq] = torch.searchsorted(key_sorted_HT.contiguous(), j_HJ) + row0_H1
    list_begin_L = bounds_RJ[:, :-1].flatten()
    list_end_L = bounds_RJ[:, 1:].flatten()
    tiles_L = (list_end_L - list_begin_L + tile_rows - 1) // tile_rows
    tile_end_L = tiles_L.cumsum(0)
    tile_first_L = tile_end_L - tiles_L
    u_U = torch.arange(K1 * per_slot, device=device)
    tile_list_U = torch.searchsorted(tile_end_L, u_U, right=True).clamp(max=n_lists - 1)
    tile_row0_U = list_begin_L[tile_list_U] + (u_U - tile_first_L[tile_list_U]) * tile_rows
    slot_tile_start = torch.cat([tile_first_L[:: Hq * n_blocks], tile_end_L[-1:]])
    return GatherLists(
        tokens_E=tokens_E,
        list_begin_L=list_begin_L,
        list_end_L=list_end_L,
        tile_list_U=tile_list_U,
        tile_row0_U=tile_row0_U,
        slot_tile_start=slot_tile_start,
        tiles_per_slot=per_slot,
    )


@dataclass
class KeyBlockChunks:
    """The routed queries of each key block, cut into chunks so that a block most queries chose
    (an attention sink) is shared by several dk/dv programs instead of serializing one.

    Pair w = g * Hkv + hk is key block g at KV head hk. Its routed rows are its lists
    (s * Hq + h) * NB + g for the group's query heads h and every slot s, laid end to end in
    (head, slot) order; rows [c * rows, (c + 1) * rows) are chunk c. Chunk 0 stays with the
    pair's own program; chunk c >= 1 is partial p = first_W[w] + c - 1, with owner_P[p] = w and
    index_P[p] = c. Partials number at most `n_partials` = E // rows, a bound from shapes.
    """

    first_W: torch.Tensor
    owner_P: torch.Tensor
    index_P: torch.Tensor
    rows: int
    n_partials: int


def key_block_chunks(
    lists: GatherLists, k1: int, n_heads: int, n_kv_heads: int, n_blocks: int, rows: int
) -> KeyBlockChunks:
    device = lists.tokens_E.device
    W = n_blocks * n_kv_heads
    if k1 == 0:
        nothing = torch.zeros(1, dtype=torch.int64, device=device)
        return KeyBlockChunks(torch.zeros(W + 1, dtype=torch.int64, device=device), nothing, nothing, rows, 0)
    sizes_L = lists.list_end_L - lists.list_begin_L
    groups = n_heads // n_kv_heads
    rows_W = sizes_L.view(k1, n_kv_heads, groups, n_blocks).sum((0, 2)).T.flatten()
    # Every chunk of a pair but the first: floor((R - 1) / rows) of R rows, <= R / rows, so their
    # sum over pairs stays within E // rows.
    extra_W = (rows_W - 1).clamp(min=0) // rows
    first_W = torch.cat([extra_W.new_zeros(1), extra_W.cumsum(0)])
    P = lists.tokens_E.numel() // rows
    p_P = torch.arange(P, device=device)
    owner_P = torch.searchsorted(first_W[1:], p_P, right=True).clamp(max=W - 1)
    return KeyBlockChunks(first_W, owner_P, p_P - first_W[owner_P] + 1, rows, P)
