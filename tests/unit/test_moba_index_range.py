"""The MoBA kernels' index arithmetic at the int32 boundary, without allocating it: the sizing
checks on plain numbers, and the gather-list bookkeeping on meta tensors.

Routed entries number tokens x heads x (K - 1), past 2^31 - 1 at 4M tokens, 64 heads, K = 9:
positions among them are int64, a sort never spans more than one (slot, head) row of tokens
(torch's CUDA sort refuses a dimension over 2^31 - 1), and what stays int32 is refused by name.

Shape legend: T tokens, Hq query heads, K1 routed slots per query, NB blocks.
"""

import pytest
import torch

from sparsetron.kernels.moba import layout, moba_triton
from sparsetron.kernels.moba.layout import INT32_MAX, check_index_range, gather_lists, n_blocks_bound, tiles_per_slot


@pytest.mark.parametrize(
    "T, Hq, K1, block_size",
    [
        (INT32_MAX, 1, 1, 4096),  # 2^31 - 1 entries
        (2**22, 64, 8, 512),  # 2^31 entries: 4M tokens, 64 heads, K = 9
        (2**21, 128, 11, 4096),  # 2^31 x 1.375
    ],
)
def test_gather_lists_keep_entry_positions_in_int64(T, Hq, K1, block_size, monkeypatch):
    sorted_rows = []
    real_sort = torch.sort

    def recording_sort(x, *args, dim=-1, **kwargs):
        sorted_rows.append(x.shape[dim])
        return real_sort(x, *args, dim=dim, **kwargs)

    monkeypatch.setattr(layout.torch, "sort", recording_sort)
    sel_THK = torch.empty(T, Hq, K1, dtype=torch.int32, device="meta")
    NB = n_blocks_bound(T, 1, block_size)
    lists = gather_lists(sel_THK, NB, 64)
    assert lists.tokens_E.dtype == torch.int32 and lists.tokens_E.numel() == T * Hq * K1
    for name in ("list_begin_L", "list_end_L", "tile_list_U", "tile_row0_U", "slot_tile_start"):
        assert getattr(lists, name).dtype == torch.int64, name
    assert sorted_rows and max(sorted_rows) <= INT32_MAX


def test_tokens_and_block_size_fit_int32():
    check_index_range(INT32_MAX - 4096, 1, 1, 4096, 64)
    with pytest.raises(ValueError, match=r"2147479552 tokens \+ block size 4096 = 2147483648 > 2\^31 - 1"):
        check_index_range(INT32_MAX - 4096 + 1, 1, 1, 4096, 64)
    # The example: tokens x heads x (K - 1) = 2^31 entries is fine.
    check_index_range(2**22, 1, 64, 512, 64)


def test_tiles_of_a_slot_fit_one_launch_grid():
    Hq, block_size, rows = 64, 4096, 64

    def tiles(T):
        return tiles_per_slot(T, Hq, n_blocks_bound(T, 1, block_size), rows)

    lo, hi = 1, INT32_MAX - block_size  # tiles(lo) fits, tiles(hi) does not
    assert tiles(lo) <= INT32_MAX < tiles(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if tiles(mid) <= INT32_MAX else (lo, mid)
    check_index_range(lo, 1, Hq, block_size, rows)
    with pytest.raises(ValueError, match=rf"{hi} tokens x 64 heads in tiles of 64 .* need {tiles(hi)} programs"):
        check_index_range(hi, 1, Hq, block_size, rows)


def test_tiles_of_a_slot_are_bounded_by_the_queries():
    """Queries that are the suffix of longer keys: a slot's work tiles grow with the queries
    (at most one list per query and head), not with the key blocks."""
    T, Hq, block_size, rows = INT32_MAX - 4096, 64, 4096, 64
    with pytest.raises(ValueError, match=r"2147479551 tokens x 64 heads .* \(2147479551 keys,"):
        check_index_range(T, 1, Hq, block_size, rows)
    check_index_range(T, 1, Hq, block_size, rows, n_queries=2**20)
    assert tiles_per_slot(2**20, Hq, n_blocks_bound(T, 1, block_size), rows) == 2**20 + Hq * (T // block_size + 1)
    assert tiles_per_slot(10, Hq, n_blocks_bound(T, 1, block_size), rows) == 10 + Hq * 10


def test_op_refuses_before_any_launch():
    """On meta tensors nothing can launch: the refusal comes from the shapes alone."""
    T = INT32_MAX - 511
    q, k, v = (torch.empty(T, 2, 64, dtype=torch.bfloat16, device="meta") for _ in range(3))
    cu = torch.empty(3, dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match=rf"{T} tokens \+ block size 512 = 2147483648 > 2\^31 - 1"):
        moba_triton(q, k, v, cu, 512, 3)
