"""Context-parallel shards of a batch (model/sequence_shard.py) and the attention ops on them
(model/attention_ops.py, per_chunk), in one process: every rank's queries against the whole keys
give exactly that rank's rows of the whole op, and the ranks' gradients sum to the whole's.

Shape legend: B rows, S positions, H query heads, K key/value heads, d head dim.
"""

import pytest
import torch

from sparsetron.model.attention_ops import MobaAttention, full_attention
from sparsetron.model.sequence import SequenceInfo
from sparsetron.model.sequence_shard import shard_sequence, zigzag_index, zigzag_order


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_zigzag_covers_every_position_once_with_equal_causal_work(ranks):
    S = 8 * ranks
    order = zigzag_order(S, ranks)
    assert torch.equal(order.sort().values, torch.arange(S))
    # A causal query at position p attends p + 1 keys: every rank gets the same total.
    work = [int((zigzag_index(S, r, ranks) + 1).sum()) for r in range(ranks)]
    assert len(set(work)) == 1, work
    assert zigzag_index(16, 1, 4).tolist() == [2, 3, 12, 13]


def test_uneven_lengths_and_bad_ranks_are_refused_with_the_numbers():
    with pytest.raises(ValueError, match="sequence length 12 must be divisible by 2 x context ranks = 8"):
        zigzag_index(12, 0, 4)
    with pytest.raises(ValueError, match="rank 2 is not one of 2"):
        zigzag_index(8, 2, 2)


def random_doc_ids(B, S, seed, p=0.12):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, S, generator=g) < p).long().cumsum(1)


def brute_force_chunk(doc_ids_BS, start, end):
    """(query lengths, key lengths) of every (row, document) piece meeting [0, end), by loops."""
    q_lens, k_lens = [], []
    for row in doc_ids_BS.tolist():
        pieces = []
        for pos in range(end):
            if pos == 0 or row[pos] != row[pos - 1]:
                pieces.append([0, 0])
            pieces[-1][1] += 1
            pieces[-1][0] += pos >= start
        q_lens += [q for q, _ in pieces]
        k_lens += [k for _, k in pieces]
    return q_lens, k_lens


@pytest.mark.parametrize("masked", [True, False])
def test_chunk_layouts_and_positions_against_loops(masked):
    B, S, ranks = 3, 48, 3
    doc_ids = random_doc_ids(B, S, seed=1)
    whole = SequenceInfo.build(B, S, doc_ids if masked else None)
    for rank in range(ranks):
        seq = shard_sequence(whole, rank, ranks)
        index = zigzag_index(S, rank, ranks)
        assert torch.equal(seq.positions_BS, whole.positions_BS[:, index])
        assert [c.local_start for c in seq.context.chunks] == [0, S // (2 * ranks)]
        for chunk in seq.context.chunks:
            assert torch.equal(
                index[chunk.local_start : chunk.local_start + chunk.length] - chunk.global_start,
                torch.arange(chunk.length),
            )
            ids = doc_ids if masked else torch.zeros(B, S, dtype=torch.long)
            q_lens, k_lens = brute_force_chunk(ids, chunk.global_start, chunk.global_end)
            assert torch.diff(chunk.cu_seqlens_q).tolist() == q_lens
            assert torch.diff(chunk.cu_seqlens_k).tolist() == k_lens
            assert (chunk.max_seqlen_q, chunk.max_seqlen_k) == (max(q_lens), max(k_lens))
            assert chunk.cu_seqlens_q.dtype == chunk.cu_seqlens_k.dtype == torch.int32


def qkv(B, S, H, K, d, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, S, h, d, generator=g, dtype=torch.float64) for h in (H, K, K)]


def assert_shards_equal_whole(op, whole, ranks, H=4, K=2, d=8, seed=0):
    """Each rank's queries against the whole keys give the whole op's rows of that rank, and the
    key/value gradients summed over the ranks (what the reduce-scatter does) are the whole's."""
    B, S = whole.batch_size, whole.seq_len
    q, k, v = qkv(B, S, H, K, d, seed)
    do = torch.randn(B, S, H, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o = op(*leaves, whole)
    o.backward(do)
    dk_sum, dv_sum = torch.zeros_like(k), torch.zeros_like(v)
    for rank in range(ranks):
        seq = shard_sequence(whole, rank, ranks)
        index = seq.context.index_S
        q_r = q[:, index].clone().requires_grad_()
        k_r, v_r = k.clone().requires_grad_(), v.clone().requires_grad_()
        o_r = op(q_r, k_r, v_r, seq)
        o_r.backward(do[:, index])
        scale = o.detach().abs().max()
        assert (o_r.detach() - o.detach()[:, index]).abs().max() <= 1e-12 * scale, rank
        torch.testing.assert_close(q_r.grad, leaves[0].grad[:, index], rtol=1e-10, atol=1e-12)
        dk_sum += k_r.grad
        dv_sum += v_r.grad
    torch.testing.assert_close(dk_sum, leaves[1].grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dv_sum, leaves[2].grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("ranks", [2, 4])
def test_full_attention_on_shards_equals_the_whole(masked, ranks):
    B, S = 2, 32
    doc_ids = random_doc_ids(B, S, seed=ranks) if masked else None
    assert_shards_equal_whole(full_attention, SequenceInfo.build(B, S, doc_ids), ranks)


MOBA_CASES = {
    # name: (block size, topk, sequence length, document-start probability)
    "one row, top 2": (4, 2, 32, 0.0),
    "K = 1": (4, 1, 32, 0.0),
    "documents straddling chunks": (4, 3, 48, 0.1),
    "sequences shorter than a block": (8, 2, 32, 0.4),
}


@pytest.mark.parametrize("case", list(MOBA_CASES))
@pytest.mark.parametrize("ranks", [2, 4])
def test_moba_on_shards_equals_the_whole(case, ranks):
    block, topk, S, p = MOBA_CASES[case]
    doc_ids = random_doc_ids(2, S, seed=7, p=p) if p else None
    assert_shards_equal_whole(MobaAttention(block, topk), SequenceInfo.build(2, S, doc_ids), ranks, seed=3)
