"""Index bookkeeping for the MoBA kernels, in torch ops that never synchronize with the host.

Every size here is a static bound computed from shapes alone (never from the contents of
`cu_seqlens` or of the routing), so the whole op can be captured in a CUDA graph; kernels
launched over a bound exit early where the bound is not reached.

Shape legend: T packed tokens, S sequences, Hq query heads, NB the bound on the number of
blocks, K1 routed slots per query (topk - 1), E = T * Hq * K1 routed entries, U work tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BlockLayout:
    """Every block of every packed sequence, numbered globally in token order.

    Block g covers tokens [start[g], end[g]); `first[g]` is the number of the first block of
    its sequence, so its fully past blocks are first[g] .. g-1. Numbers past the real count
    have start == end and are skipped.
    """

    start_NB: torch.Tensor
    end_NB: torch.Tensor
    first_NB: torch.Tensor
    n_blocks: int
    """NB: a bound on the block count, from T, S and the block size alone."""
    max_blocks_per_seq: int
    """A bound on the blocks of one sequence (ceil(T / block_size))."""


def block_layout(cu_seqlens: torch.Tensor, n_tokens: int, block_size: int) -> BlockLayout:
    S = cu_seqlens.numel() - 1
    # sum over sequences of ceil(L / B) <= (T + S * (B - 1)) / B.
    NB = max((n_tokens + S * (block_size - 1)) // block_size, 1)
    cu = cu_seqlens.to(torch.int64)
    blocks_S = (cu[1:] - cu[:-1] + block_size - 1) // block_size
    cu_blocks = torch.cat([blocks_S.new_zeros(1), blocks_S.cumsum(0)])
    g_NB = torch.arange(NB, device=cu.device)
    seq_NB = (torch.searchsorted(cu_blocks, g_NB, right=True) - 1).clamp(0, max(S - 1, 0))
    first_NB = cu_blocks[seq_NB]
    start_NB = cu[seq_NB] + (g_NB - first_NB) * block_size
    end_NB = torch.minimum(start_NB + block_size, cu[seq_NB + 1])
    real_NB = g_NB < cu_blocks[-1]
    start_NB = torch.where(real_NB, start_NB, 0)
    end_NB = torch.where(real_NB, end_NB, 0)
    return BlockLayout(
        start_NB=start_NB.to(torch.int32),
        end_NB=end_NB.to(torch.int32),
        first_NB=first_NB.to(torch.int32),
        n_blocks=NB,
        max_blocks_per_seq=-(-n_tokens // block_size),
    )


@dataclass
class GatherLists:
    """For each (query head h, block j), the routed entries that chose j: the queries to gather.

    An entry e = (t * Hq + h) * K1 + s is slot s of query t at head h; `entries_E` holds the
    entries sorted by list h * NB + j and, within a list, by t. List l occupies
    entries_E[list_start[l] : list_start[l + 1]]. The lists are cut into tiles of `tile_rows`
    entries; tile u belongs to list tile_list[u] (== Hq * NB past the real tiles) and starts at
    entries_E[tile_row0[u]].
    """

    entries_E: torch.Tensor
    list_start: torch.Tensor
    tile_list_U: torch.Tensor
    tile_row0_U: torch.Tensor
    n_tiles: int
    """U: a bound on the tile count."""


def gather_lists(sel_THK: torch.Tensor, n_blocks: int, tile_rows: int) -> GatherLists:
    """Group the routed picks `sel_THK` (block number, or -1 for none) by (head, block)."""
    T, Hq, K1 = sel_THK.shape
    n_lists = Hq * n_blocks
    h_1H1 = torch.arange(Hq, device=sel_THK.device).view(1, Hq, 1)
    # Unused slots sort past every list.
    key_E = torch.where(sel_THK >= 0, h_1H1 * n_blocks + sel_THK, n_lists).flatten()
    # A stable sort keeps each list in entry order, which is query order.
    key_sorted_E, entries_E = torch.sort(key_E, stable=True)
    list_ids = torch.arange(n_lists + 1, device=sel_THK.device)
    list_start = torch.searchsorted(key_sorted_E, list_ids)
    tiles_L = (list_start[1:] - list_start[:-1] + tile_rows - 1) // tile_rows
    tile_end_L = tiles_L.cumsum(0)
    # Each list's tiles hold at most tile_rows - 1 unused rows.
    U = max(-(-T * Hq * K1 // tile_rows) + n_lists, 1)
    u_U = torch.arange(U, device=sel_THK.device)
    tile_list_U = torch.searchsorted(tile_end_L, u_U, right=True)
    list_U = tile_list_U.clamp(max=n_lists - 1)
    tile_row0_U = list_start[list_U] + (u_U - (tile_end_L - tiles_L)[list_U]) * tile_rows
    return GatherLists(
        entries_E=entries_E.to(torch.int32),
        list_start=list_start.to(torch.int32),
        tile_list_U=tile_list_U.to(torch.int32),
        tile_row0_U=tile_row0_U.to(torch.int32),
        n_tiles=U,
    )
