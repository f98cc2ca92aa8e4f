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
    """For each (slot s, query head h, block j), the routed entries that chose j in slot s.

    An entry e = (t * Hq + h) * K1 + s is slot s of query t at head h. `entries_E` holds the
    entries sorted by list (s * Hq + h) * NB + j and, within a list, by t; list l occupies
    entries_E[list_start[l] : list_start[l + 1]]. Lists are cut into tiles of `tile_rows`
    entries: tile u belongs to list tile_list[u] and starts at entries_E[tile_row0[u]]. Slot s
    owns tiles slot_tile_start[s] .. slot_tile_start[s + 1] - 1, at most `tiles_per_slot`.

    Within one slot a (query, head) appears at most once, so kernels launched slot by slot
    can update per-query accumulators without races, in a fixed order.
    """

    entries_E: torch.Tensor
    list_start: torch.Tensor
    tile_list_U: torch.Tensor
    tile_row0_U: torch.Tensor
    slot_tile_start: torch.Tensor
    tiles_per_slot: int


def gather_lists(sel_THK: torch.Tensor, n_blocks: int, tile_rows: int) -> GatherLists:
    """Group the routed picks `sel_THK` (block number, or -1 for none) by (slot, head, block)."""
    T, Hq, K1 = sel_THK.shape
    device = sel_THK.device
    lists_per_slot = Hq * n_blocks
    n_lists = K1 * lists_per_slot
    # Each list's tiles hold at most tile_rows - 1 unused rows.
    tiles_per_slot = -(-T * Hq // tile_rows) + lists_per_slot
    if K1 == 0:
        nothing = torch.zeros(1, dtype=torch.int32, device=device)
        return GatherLists(nothing, nothing, nothing, nothing, nothing, 0)
    s_11K = torch.arange(K1, device=device).view(1, 1, K1)
    h_1H1 = torch.arange(Hq, device=device).view(1, Hq, 1)
    # Unused slots sort past every list.
    key_E = torch.where(sel_THK >= 0, (s_11K * Hq + h_1H1) * n_blocks + sel_THK, n_lists).flatten()
    # A stable sort keeps each list in entry order, which is query order.
    key_sorted_E, entries_E = torch.sort(key_E, stable=True)
    list_start = torch.searchsorted(key_sorted_E, torch.arange(n_lists + 1, device=device))
    tiles_L = (list_start[1:] - list_start[:-1] + tile_rows - 1) // tile_rows
    tile_end_L = tiles_L.cumsum(0)
    tile_first_L = tile_end_L - tiles_L
    u_U = torch.arange(K1 * tiles_per_slot, device=device)
    tile_list_U = torch.searchsorted(tile_end_L, u_U, right=True).clamp(max=n_lists - 1)
    tile_row0_U = list_start[tile_list_U] + (u_U - tile_first_L[tile_list_U]) * tile_rows
    slot_tile_start = torch.cat([tile_first_L[::lists_per_slot], tile_end_L[-1:]])
    return GatherLists(
        entries_E=entries_E.to(torch.int32),
        list_start=list_start.to(torch.int32),
        tile_list_U=tile_list_U.to(torch.int32),
        tile_row0_U=tile_row0_U.to(torch.int32),
        slot_tile_start=slot_tile_start.to(torch.int32),
        tiles_per_slot=tiles_per_slot,
    )
