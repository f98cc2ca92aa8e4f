"""The MoBA Triton kernels against the reference, on the CPU through Triton's interpreter.

tests/conftest.py sets TRITON_INTERPRET=1 where there is no GPU; the interpreter computes in
fp32, so these are fp32 tests on small odd shapes (tests/gpu/test_moba_gpu.py repeats them in
bf16 at larger sizes). Every output buffer the kernels allocate starts as NaN, so an element no
kernel writes fails the comparison.

Shape legend: T packed tokens, Hq/Hkv heads, D head dim, B block size, K blocks per query.
"""

import collections
import inspect
import types

import pytest
import torch
import triton.language as tl

from sparsetron.kernels import moba
from sparsetron.kernels.moba import backward as moba_backward
from sparsetron.kernels.moba import dkdv as moba_dkdv
from sparsetron.kernels.moba import forward as moba_forward
from sparsetron.kernels.moba import moba_reference, moba_selection, moba_triton
from sparsetron.kernels.moba import routing as moba_routing
from sparsetron.kernels.moba.layout import block_layout, gather_lists
from sparsetron.kernels.moba.tiles import launch_tiles


def _poisoned(t: torch.Tensor) -> torch.Tensor:
    # An unwritten float reads NaN; an unwritten block number points past every block.
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(1 << 30)


@pytest.fixture(autouse=True)
def nan_filled_buffers(monkeypatch):
    """The kernels' modules allocate through a torch whose empty tensors are poisoned."""
    poisoned_torch = types.SimpleNamespace(
        **{name: getattr(torch, name) for name in dir(torch) if not name.startswith("__")},
    )
    poisoned_torch.empty = lambda *a, **kw: _poisoned(torch.empty(*a, **kw))
    poisoned_torch.empty_like = lambda *a, **kw: _poisoned(torch.empty_like(*a, **kw))
    for module in (moba_forward, moba_backward, moba_dkdv, moba_routing):
        monkeypatch.setattr(module, "torch", poisoned_torch)


def packed(lengths, hq, hkv, d, seed):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q, k, v = (torch.randn(T, h, d, generator=g) for h in (hq, hkv, hkv))
    do = torch.randn(T, hq, d, generator=g)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, do, cu


def output_and_grads(fn, q, k, v, do, cu, block_size, topk, dtype, cu_k=None):
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    o = fn(q, k, v, cu, block_size, topk, cu_k)
    return (o, *torch.autograd.grad(o, (q, k, v), do.to(dtype)))


def assert_matches_reference(lengths, hq, hkv, d, block_size, topk, seed=0):
    """Kernel o, dq, dk, dv in fp32 against the fp64 reference, within a few times torch's own fp32 error."""
    q, k, v, do, cu = packed(lengths, hq, hkv, d, seed)
    assert_inputs_match_reference(q, k, v, do, cu, block_size, topk)


def assert_inputs_match_reference(q, k, v, do, cu, block_size, topk, cu_k=None):
    args = (q, k, v, do, cu, block_size, topk)
    exact = output_and_grads(moba_reference, *args, torch.float64, cu_k)
    torch_fp32 = output_and_grads(moba_reference, *args, torch.float32, cu_k)
    kernel = output_and_grads(moba_triton, *args, torch.float32, cu_k)
    for name, ours, theirs, truth in zip(("o", "dq", "dk", "dv"), kernel, torch_fp32, exact, strict=True):
        assert ours.dtype == torch.float32 and ours.shape == truth.shape
        err = (ours.double() - truth).abs().max().item()
        torch_err = (theirs.double() - truth).abs().max().item()
        assert err <= 8 * torch_err + 1e-6, f"{name}: kernel error {err:.2e}, torch fp32 error {torch_err:.2e}"
    return kernel


@pytest.mark.parametrize(
    "lengths, hq, hkv, d, block_size, topk",
    [
        ([83], 2, 2, 16, 16, 3),  # partial last block, GQA 1
        ([77], 4, 2, 32, 8, 2),  # GQA 2, many blocks
        ([70], 4, 1, 16, 8, 4),  # GQA 4
        ([61, 5, 40], 2, 1, 24, 12, 3),  # a sequence shorter than a block; head dim 24, block 12 (not powers of 2)
        ([9, 30, 1, 0, 17, 22, 3], 2, 2, 16, 8, 2),  # many documents in one pack, an empty one
        ([100], 2, 2, 16, 24, 3),  # blocks of 24 cut into tiles of 16
    ],
)
def test_kernels_equal_reference(lengths, hq, hkv, d, block_size, topk):
    assert_matches_reference(lengths, hq, hkv, d, block_size, topk)


def test_k1_is_block_diagonal_causal():
    """K = 1: no routing; each query sees the causal part of its own block only."""
    assert_matches_reference([50, 21], 2, 1, 16, 16, 1)
    q, k, v, _, cu = packed([50], 2, 2, 16, seed=3)
    o = moba_triton(q, k, v, cu, 16, 1)
    # Token 20 (block 1) must not depend on block 0: change block 0's values.
    v2 = v.clone()
    v2[:16] = torch.randn_like(v2[:16])
    assert torch.equal(o[16:], moba_triton(q, k, v2, cu, 16, 1)[16:])
    assert not torch.allclose(o[:16], moba_triton(q, k, v2, cu, 16, 1)[:16])


def test_short_sequences_are_full_causal_attention():
    """L <= K * B: every past block is selected, so MoBA is plain causal attention."""
    lengths, block_size, topk = [47, 13], 16, 3
    q, k, v, _, cu = packed(lengths, 4, 2, 16, seed=4)
    o = moba_triton(q, k, v, cu, block_size, topk)
    start = 0
    for L in lengths:
        sl = slice(start, start + L)
        dense = torch.nn.functional.scaled_dot_product_attention(
            q[sl].transpose(0, 1), k[sl].transpose(0, 1), v[sl].transpose(0, 1), is_causal=True, enable_gqa=True
        ).transpose(0, 1)
        torch.testing.assert_close(o[sl], dense, rtol=1e-5, atol=1e-5)
        start += L


def test_many_past_blocks_with_large_k():
    """K larger than the number of past blocks: every past block is read, nothing invalid is."""
    assert_matches_reference([45], 2, 2, 16, 8, 12)


@pytest.mark.parametrize(
    "lengths, hq, hkv, block_size, topk",
    [([90, 37], 4, 2, 8, 4), ([150, 61], 2, 1, 3, 6)],  # the second has 49 past blocks: chunks merge
)
def test_routing_picks_the_reference_blocks(lengths, hq, hkv, block_size, topk):
    """The streamed top-k equals the reference's selection (per query and head) exactly."""
    d = 16
    q, k, _, _, cu = packed(lengths, hq, hkv, d, seed=5)
    tiles = launch_tiles(q)
    layout = block_layout(cu, q.shape[0], block_size)
    sel_THK = moba_routing.route(q, k, layout, block_size, topk - 1, tiles)
    start = 0
    for seq, L in enumerate(lengths):
        chosen_HLn = moba_selection(
            q[start : start + L], k[start : start + L].repeat_interleave(hq // hkv, 1), block_size, topk
        )
        first_block = sum(-(-x // block_size) for x in lengths[:seq])
        n = chosen_HLn.shape[2]
        ours_HLn = torch.zeros_like(chosen_HLn)
        sel_LHK = sel_THK[start : start + L].long()
        for t in range(L):
            ours_HLn[:, t, t // block_size] = True
            for h in range(hq):
                for j in sel_LHK[t, h].tolist():
                    if j >= 0:
                        assert first_block <= j < first_block + n
                        ours_HLn[h, t, j - first_block] = True
        assert torch.equal(ours_HLn, chosen_HLn)
        start += L


def sink_inputs(lengths, hq, hkv, d, block_size, seed):
    """Packed inputs whose first block of every sequence wins every query's gate: its keys and all
    queries share a direction w, far above the spread of the other block means."""
    q, k, v, do, cu = packed(lengths, hq, hkv, d, seed)
    w = torch.nn.functional.normalize(torch.randn(d, generator=torch.Generator().manual_seed(seed + 1)), dim=0)
    q += 4 * w
    for start in cu[:-1].tolist():
        k[start : start + block_size] += 8 * w
    return q, k, v, do, cu


@pytest.mark.parametrize("lengths, hq, hkv, topk", [([110, 29], 4, 2, 3), ([97], 2, 1, 4)])
def test_attention_sink_backward_splits_and_matches_reference(lengths, hq, hkv, topk, monkeypatch):
    """Every query picks its sequence's block 0; with dk/dv chunks of 16 routed rows that block's
    readers are cut into many chunks, no program reads more than 16 of them, and the reduced
    partials still match fp64, bitwise the same run to run."""
    d, block_size, chunk_rows = 16, 8, 16
    q, k, v, do, cu = sink_inputs(lengths, hq, hkv, d, block_size, seed=11)
    start = 0
    for L in lengths:
        chosen_HLn = moba_selection(q[start : start + L], k[start : start + L].repeat_interleave(hq // hkv, 1), 8, topk)
        assert chosen_HLn[:, block_size:, 0].all()
        start += L
    monkeypatch.setattr(moba_dkdv, "dkdv_chunk_rows", lambda *args: chunk_rows)
    chunks = []
    real_chunks = moba_dkdv.key_block_chunks
    monkeypatch.setattr(moba_dkdv, "key_block_chunks", lambda *a: chunks.append(real_chunks(*a)) or chunks[-1])
    # Routed query rows each dk/dv program reads (the interpreter runs kernels as Python).
    routed_rows = collections.Counter()
    real_from_queries = moba_dkdv._dkdv_from_queries

    def counting_from_queries(*args):
        if not args[17]:  # CAUSAL False: gathered rows
            kernel = next(f.function for f in inspect.stack() if f.function.startswith("_bwd_dkdv"))
            pid = tuple(int(tl.program_id(axis).handle.data.reshape(-1)[0]) for axis in range(3))
            routed_rows[kernel, pid] += int(args[6].handle.data.sum())
        return real_from_queries(*args)

    monkeypatch.setattr(moba_dkdv, "_dkdv_from_queries", counting_from_queries)
    first = assert_inputs_match_reference(q, k, v, do, cu, block_size, topk)
    assert max(routed_rows.values()) <= chunk_rows
    monkeypatch.setattr(moba_dkdv, "_dkdv_from_queries", real_from_queries)
    # Block 0, KV head 0: all later queries of the group's heads, cut into chunks of 16 rows.
    readers = (hq // hkv) * (lengths[0] - block_size)
    first_W = chunks[0].first_W
    assert first_W[1] - first_W[0] == -(-readers // chunk_rows) - 1 >= 8
    again = output_and_grads(moba_triton, q, k, v, do, cu, block_size, topk, torch.float32)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)


def test_routing_breaks_ties_by_block_number():
    """Equal gates (identical blocks) are ordered by block number, also across candidate chunks."""
    block_size, n_blocks = 2, 40
    g = torch.Generator().manual_seed(10)
    k = 0.01 * torch.randn(block_size * n_blocks, 1, 16, generator=g)
    k[2:4] = k[34:36] = 5.0  # blocks 1 and 17 tie, far above the rest
    q = torch.rand(k.shape[0], 1, 16, generator=g) + 0.5  # every gate against them is positive
    cu = torch.tensor([0, k.shape[0]], dtype=torch.int32)
    layout = block_layout(cu, k.shape[0], block_size)
    for topk, expected in ((2, [1]), (3, [1, 17])):
        sel_THK = moba_routing.route(q, k, layout, block_size, topk - 1, launch_tiles(q))
        assert sel_THK[-4:, 0].tolist() == [expected] * 4


def test_block_layout_covers_every_sequence():
    """Blocks tile each sequence in order; past the real count they are empty."""
    g = torch.Generator().manual_seed(6)
    for _ in range(20):
        lengths = torch.randint(0, 50, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        block_size = int(torch.randint(1, 20, (1,), generator=g))
        T = sum(lengths)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        layout = block_layout(cu, T, block_size)
        expected = []
        for s, L in enumerate(lengths):
            base = int(cu[s])
            first = len(expected)
            expected += [(base + b, min(base + b + block_size, base + L), first) for b in range(0, L, block_size)]
        real = len(expected)
        assert layout.n_blocks >= real
        got = list(zip(layout.start_NB.tolist(), layout.end_NB.tolist(), layout.first_NB.tolist(), strict=True))
        assert got[:real] == expected
        assert all(start == end for start, end, _ in got[real:])


def test_block_layout_places_suffix_queries_in_their_key_blocks():
    """With queries the last Lq of Lk keys: each key block's query rows and their shift to key
    positions, and the query blocks (the key blocks holding queries, then the empty block NB)."""
    g = torch.Generator().manual_seed(14)
    for _ in range(20):
        lk = torch.randint(0, 50, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        lq = [int(torch.randint(0, n + 1, (1,), generator=g)) for n in lk]
        block_size = int(torch.randint(1, 20, (1,), generator=g))
        cu_q, cu_k = (torch.tensor([0, *torch.tensor(x).cumsum(0).tolist()], dtype=torch.int32) for x in (lq, lk))
        layout = block_layout(cu_k, sum(lk), block_size, cu_q, sum(lq))
        expected, holding = [], []
        for s, (n_q, n_k) in enumerate(zip(lq, lk, strict=True)):
            k0, shift = int(cu_k[s]), int(cu_k[s + 1] - cu_q[s + 1])
            for b in range(0, n_k, block_size):
                keys = range(k0 + b, k0 + min(b + block_size, n_k))
                queries = [u - shift for u in keys if u >= k0 + n_k - n_q]
                if queries:
                    holding.append(len(expected))
                    expected.append((queries[0], queries[-1] + 1, shift))
                else:
                    expected.append((0, 0, None))
        real = len(expected)
        got = zip(layout.qstart_NB.tolist(), layout.qend_NB.tolist(), layout.shift_NB.tolist(), strict=True)
        got = [(a, b, shift if a < b else None) for a, b, shift in got]
        assert got[:real] == expected and all(a == b for a, b, _ in got[real:])
        assert layout.qend_NB[-1] == layout.qstart_NB[-1] and layout.qstart_NB.numel() == layout.n_blocks + 1
        assert len(holding) <= layout.n_query_blocks <= max(sum(lq), 1)
        qblock_P = layout.qblock_P.tolist()
        assert qblock_P == holding + [layout.n_blocks] * (layout.n_query_blocks - len(holding))


def test_gather_lists_group_entries_by_slot_head_and_block():
    g = torch.Generator().manual_seed(7)
    T, Hq, K1, NB, rows = 23, 3, 2, 5, 4
    sel = torch.randint(-1, NB, (T, Hq, K1), generator=g, dtype=torch.int32)
    lists = gather_lists(sel, NB, rows)
    assert lists.tokens_E.dtype == torch.int32 and lists.list_begin_L.dtype == torch.int64
    for s in range(K1):
        for h in range(Hq):
            for j in range(NB):
                lst = (s * Hq + h) * NB + j
                t = lists.tokens_E[lists.list_begin_L[lst] : lists.list_end_L[lst]].long()
                assert (sel[t, h, s] == j).all()
                assert torch.equal(t, torch.sort(t).values)
                assert len(t) == int((sel[:, h, s] == j).sum())
    # Tiles: slot by slot, each list's entries are covered once, within the per-slot bound.
    for s in range(K1):
        first, end = int(lists.slot_tile_start[s]), int(lists.slot_tile_start[s + 1])
        assert end - first <= lists.tiles_per_slot
        covered = []
        for u in range(first, end):
            lst = int(lists.tile_list_U[u])
            assert lst // (Hq * NB) == s
            row0, row_end = int(lists.tile_row0_U[u]), int(lists.list_end_L[lst])
            covered += list(range(row0, min(row0 + rows, row_end)))
        slot_lists = range(s * Hq * NB, (s + 1) * Hq * NB)
        expected = [r for lst in slot_lists for r in range(lists.list_begin_L[lst], lists.list_end_L[lst])]
        assert sorted(covered) == expected


def suffix_packed(pairs, hq, hkv, d, seed):
    """Queries that are the last Lq of their sequence's Lk keys, for (Lq, Lk) in `pairs`."""
    g = torch.Generator().manual_seed(seed)
    lq, lk = zip(*pairs, strict=True)
    q, do = (torch.randn(sum(lq), hq, d, generator=g) for _ in range(2))
    k, v = (torch.randn(sum(lk), hkv, d, generator=g) for _ in range(2))
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(x).cumsum(0).tolist()], dtype=torch.int32) for x in (lq, lk))
    return q, k, v, do, cu_q, cu_k


@pytest.mark.parametrize(
    "pairs, hq, hkv, block_size, topk",
    [
        # (Lq, Lk): a document that ended before the chunk (Lq 0), one wholly inside (Lq = Lk), fewer
        # queries than a block starting mid-block, queries from mid-block over several blocks, a
        # document shorter than a block; GQA 2.
        ([(0, 13), (20, 20), (5, 30), (11, 35), (3, 3), (0, 0)], 2, 1, 8, 3),
        ([(30, 70)], 1, 1, 24, 3),  # blocks of 24 in tiles of 16: query tiles start mid-block
        ([(13, 40), (9, 9)], 2, 1, 8, 1),  # K = 1: no routing
        ([(12, 30)], 1, 1, 8, 12),  # K beyond the 4 blocks
    ],
)
def test_suffix_queries_equal_reference(pairs, hq, hkv, block_size, topk):
    q, k, v, do, cu_q, cu_k = suffix_packed(pairs, hq, hkv, 16, seed=len(pairs) + topk)
    assert_inputs_match_reference(q, k, v, do, cu_q, block_size, topk, cu_k)


def test_keys_split_like_queries_give_the_same_bits():
    """cu_seqlens_k = cu_seqlens takes the query-offset path, which must reduce to the plain one."""
    q, k, v, do, cu = packed([21, 3, 14], 1, 1, 16, seed=12)
    plain = output_and_grads(moba_triton, q, k, v, do, cu, 8, 3, torch.float32)
    offset = output_and_grads(moba_triton, q, k, v, do, cu, 8, 3, torch.float32, cu.clone())
    for a, b in zip(plain, offset, strict=True):
        assert torch.equal(a, b)


class _LaunchLog:
    """Stands in for a Triton kernel of a module: records the largest first grid axis it is
    launched over, then launches."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        name = self.kernel.__name__
        self.log[name] = max(self.log[name], grid[0])
        return self.kernel[grid]


def test_work_follows_the_queries_not_the_keys(monkeypatch):
    """A few queries after a long key prefix: only the block means and dk/dv (which write every
    key) launch over the key blocks; every other kernel's grid is bounded by the queries alone."""
    pairs, hq, block_size = [(3, 200), (0, 40), (4, 4)], 2, 8
    q, k, v, do, cu_q, cu_k = suffix_packed(pairs, hq, 1, 16, seed=13)
    launches = collections.defaultdict(int)
    for module in (moba_routing, moba_forward, moba_backward, moba_dkdv):
        for name in dir(module):
            if name.endswith("_kernel"):
                monkeypatch.setattr(module, name, _LaunchLog(getattr(module, name), launches))
    assert_inputs_match_reference(q, k, v, do, cu_q, block_size, 3, cu_k)
    key_side = {"_block_means_kernel", "_bwd_dkdv_kernel"}
    per_query = {"_route_kernel", "_fwd_routed_kernel", "_fwd_current_kernel", "_bwd_delta_kernel"}
    per_query |= {"_bwd_dq_routed_kernel", "_bwd_dq_current_kernel"}
    assert set(launches) - {"_bwd_dkdv_chunk_kernel"} == key_side | per_query
    # A program per query tile of a block, per (list, tile of it) of a slot, per partial: each
    # bounded by 2 Tq Hq = 28; the key blocks number 31.
    Tq, n_key_blocks = q.shape[0], -(-k.shape[0] // block_size)
    worst = {name: grid for name, grid in launches.items() if name not in key_side}
    assert max(worst.values()) <= 2 * Tq * hq < n_key_blocks, worst


def test_public_op_runs_the_reference_off_cuda():
    q, k, v, _, cu = packed([40], 2, 1, 16, seed=8)
    assert torch.equal(moba.moba_attention(q, k, v, cu, 8, 2), moba_reference(q, k, v, cu, 8, 2))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda q, k, v, cu: (q, k[:, :, :8], v[:, :, :8], cu), "must be \\[Tk, Hkv, D\\]"),
        (
            lambda q, k, v, cu: (q, k.repeat(1, 3, 1)[:, :3], v.repeat(1, 3, 1)[:, :3], cu),
            "multiple of key/value heads",
        ),
        (lambda q, k, v, cu: (q, k, v, cu.long()), "int32"),
        (lambda q, k, v, cu: (q, k.double(), v, cu), "share a dtype"),
        (lambda q, k, v, cu: (q.repeat(1, 1, 20), k.repeat(1, 1, 20), v.repeat(1, 1, 20), cu), "head dims up to 256"),
    ],
)
def test_bad_inputs_name_the_problem(change, message):
    q, k, v, _, cu = packed([20], 4, 2, 16, seed=9)
    with pytest.raises(ValueError, match=message):
        moba_triton(*change(q, k, v, cu), 8, 2)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda q, k, v, cu_q, cu_k: (q, k, v, cu_q, None), "k has 30 tokens and q 9: .* need cu_seqlens_k"),
        (lambda q, k, v, cu_q, cu_k: (q, k, v, cu_q, cu_k.long()), "cu_seqlens_k must be a 1-D int32"),
        (lambda q, k, v, cu_q, cu_k: (q, k, v, cu_q, cu_k[1:]), r"cu_seqlens_k \(2,\) must split k .* \(3,\)"),
        (lambda q, k, v, cu_q, cu_k: (q, k, v, cu_q, cu_k.to("meta")), "cu_seqlens_k is on meta, q on cpu"),
        (lambda q, k, v, cu_q, cu_k: (q, k.to("meta"), v, cu_q, cu_k), "must share a device"),
        (lambda q, k, v, cu_q, cu_k: (q, k, v[:-1], cu_q, cu_k), r"k \(30, 1, 16\) and v \(29, 1, 16\)"),
    ],
)
def test_bad_suffix_inputs_name_the_problem(change, message):
    q, k, v, _, cu_q, cu_k = suffix_packed([(4, 10), (5, 20)], 2, 1, 16, seed=9)
    q, k, v, cu_q, cu_k = change(q, k, v, cu_q, cu_k)
    with pytest.raises(ValueError, match=message):
        moba_triton(q, k, v, cu_q, 8, 2, cu_k)
