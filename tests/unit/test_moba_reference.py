"""The MoBA reference against an independent brute force and the spec's special cases, and its
queries-as-a-suffix form (separate cu_seqlens_k) against the full sequences it is cut from.

Shape legend: T packed tokens, H heads, D head dim, L tokens of one sequence, B block size, K blocks.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from sparsetron.kernels.moba import moba_attention, moba_reference

D = 16


def packed(lengths, hq, hkv, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q, k, v = (torch.randn(T, h, D, generator=g, dtype=dtype) for h in (hq, hkv, hkv))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


def brute_force_blocks(q_t, k_seq, t, block_size, topk):
    """The blocks query position t (vector q_t) reads, by the spec's rules written as loops."""
    current = t // block_size
    gates = {}
    for j in range(current):  # fully past blocks: (j + 1) B <= t
        block = k_seq[j * block_size : (j + 1) * block_size].float()
        gates[j] = float(q_t.float() @ block.mean(0))
    best = sorted(gates, key=gates.get, reverse=True)[: topk - 1]
    return {current, *best}


def brute_force(q, k, v, cu, block_size, topk):
    """o and the allowed (t, u) pairs per (head, sequence), one query at a time, in fp64."""
    T, Hq, _ = q.shape
    groups = Hq // k.shape[1]
    o = torch.zeros(T, Hq, D, dtype=torch.float64)
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        for h in range(Hq):
            k_seq, v_seq = k[start:end, h // groups], v[start:end, h // groups]
            for t in range(end - start):
                blocks = brute_force_blocks(q[start + t, h], k_seq, t, block_size, topk)
                keys = [u for u in range(t + 1) if u // block_size in blocks]
                scores = torch.stack([q[start + t, h].double() @ k_seq[u].double() for u in keys]) / math.sqrt(D)
                o[start + t, h] = torch.softmax(scores, 0) @ v_seq[keys].double()
    return o


def masked_attention(q, k, v, cu, allowed):
    """Dense attention per sequence under a given mask allowed(seq_start, L) -> bool [H, L, L]."""
    groups = q.shape[1] // k.shape[1]
    out = []
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        q_s = q[start:end].transpose(0, 1)
        k_s = k[start:end].repeat_interleave(groups, 1).transpose(0, 1)
        v_s = v[start:end].repeat_interleave(groups, 1).transpose(0, 1)
        mask = allowed(end - start)
        out.append(F.scaled_dot_product_attention(q_s, k_s, v_s, attn_mask=mask).transpose(0, 1))
    return torch.cat(out)


CASES = {
    # lengths (several documents, odd, partial last blocks), query heads, kv heads, block size, topk
    "one-doc-mha": ([45], 2, 2, 8, 2),
    "three-docs-gqa2": ([37, 3, 65], 4, 2, 8, 3),
    "gqa4-k1": ([29, 50], 4, 1, 7, 1),
    "many-short-docs": ([5, 9, 1, 12, 33], 2, 1, 4, 2),
    "k-larger-than-blocks": ([40], 2, 2, 16, 5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_brute_force(case):
    lengths, hq, hkv, block_size, topk = CASES[case]
    q, k, v, cu = packed(lengths, hq, hkv, seed=len(case))
    expected = brute_force(q, k, v, cu, block_size, topk)
    torch.testing.assert_close(moba_reference(q, k, v, cu, block_size, topk), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(moba_attention(q, k, v, cu, block_size, topk), expected, rtol=1e-10, atol=1e-12)


def test_topk_one_is_block_diagonal_causal_attention():
    q, k, v, cu = packed([50, 21], 4, 2, seed=1)
    B = 8

    def block_diagonal(L):
        t, u = torch.arange(L).view(L, 1), torch.arange(L).view(1, L)
        return (u <= t) & (u // B == t // B)

    torch.testing.assert_close(moba_reference(q, k, v, cu, B, 1), masked_attention(q, k, v, cu, block_diagonal))
    full = masked_attention(q, k, v, cu, lambda L: torch.ones(L, L, dtype=torch.bool).tril())
    assert not torch.allclose(moba_reference(q, k, v, cu, B, 1), full)


@pytest.mark.parametrize("lengths,B,K", [([24, 17], 8, 3), ([5, 3], 16, 1), ([64], 32, 2)])
def test_sequences_within_k_blocks_get_full_causal_attention(lengths, B, K):
    # L <= K * B (a sequence shorter than one block included): every past block is selected.
    q, k, v, cu = packed(lengths, 2, 1, seed=B)
    full = masked_attention(q, k, v, cu, lambda L: torch.ones(L, L, dtype=torch.bool).tril())
    torch.testing.assert_close(moba_reference(q, k, v, cu, B, K), full)


def test_routing_really_drops_blocks():
    q, k, v, cu = packed([96], 2, 2, seed=5)
    full = masked_attention(q, k, v, cu, lambda L: torch.ones(L, L, dtype=torch.bool).tril())
    sparse = moba_reference(q, k, v, cu, 8, 3)
    # The first 3 blocks see everything before them; later queries miss some blocks.
    torch.testing.assert_close(sparse[:24], full[:24])
    assert (sparse[24:] - full[24:]).abs().amax(dim=(1, 2)).gt(1e-6).float().mean() > 0.5


def test_gradients_are_dense_attention_gradients_under_the_fixed_mask():
    q, k, v, cu = packed([37, 3, 44], 4, 2, seed=7)
    B, K = 8, 2
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = moba_reference(*leaves, cu, B, K)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    # The same selection, fixed, as a dense mask (blocks from the brute force): the gate and
    # the mean keys must contribute no gradient of their own.
    bounds = cu.tolist()
    masks = {}
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        L = end - start
        mask = torch.zeros(4, L, L, dtype=torch.bool)
        for h in range(4):
            for t in range(L):
                blocks = brute_force_blocks(q[start + t, h], k[start:end, h // 2], t, B, K)
                for u in range(t + 1):
                    mask[h, t, u] = u // B in blocks
        masks[L] = mask
    fixed = [t.clone().requires_grad_() for t in (q, k, v)]
    masked_attention(*fixed, cu, lambda L: masks[L]).backward(grad_out)
    for mine, theirs in zip(leaves, fixed, strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-10, atol=1e-12)
        assert mine.grad.abs().sum() > 0


def test_fp32_and_bf16_inputs_keep_their_dtype_and_stay_close():
    q, k, v, cu = packed([40, 25], 2, 1, seed=9)
    exact = moba_reference(q, k, v, cu, 8, 2)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        low = moba_reference(q.to(dtype), k.to(dtype), v.to(dtype), cu, 8, 2)
        assert low.dtype == dtype
        torch.testing.assert_close(low.double(), exact, rtol=tol, atol=tol)


def test_bad_arguments_are_refused():
    q, k, v, cu = packed([10], 3, 2, seed=0)
    with pytest.raises(ValueError, match="multiple of key/value heads 2"):
        moba_reference(q, k, v, cu, 4, 2)
    q, k, v, cu = packed([10], 2, 2, seed=0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        moba_reference(q, k, v, torch.tensor([0, 6, 4, 10], dtype=torch.int32), 4, 2)
    with pytest.raises(ValueError, match="block_size >= 1 and topk >= 1"):
        moba_reference(q, k, v, cu, 4, 0)


SUFFIX_CASES = {
    # (Lq, Lk) per sequence, query heads, kv heads, block size, topk. A document that ended before
    # the chunk (Lq 0), one wholly in it (Lq = Lk), fewer queries than a block, queries starting
    # mid-block, a document shorter than a block, an empty one.
    "mixed-gqa2": ([(0, 21), (37, 37), (5, 30), (19, 53), (3, 3), (0, 0)], 4, 2, 8, 3),
    "k1": ([(13, 40), (9, 9)], 2, 1, 8, 1),
    "k-beyond-blocks": ([(30, 61)], 2, 2, 8, 12),
    "gqa4-block-7": ([(25, 64), (1, 50)], 4, 1, 7, 2),
}


def output_and_grads(q, k, v, do, cu, block_size, topk, cu_k=None):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    o = moba_reference(q, k, v, cu, block_size, topk, cu_k)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


@pytest.mark.parametrize("case", list(SUFFIX_CASES))
def test_suffix_queries_are_the_last_rows_of_their_full_sequences(case):
    """Queries given as the last Lq of Lk keys: o and dq are those rows of the full sequences'
    (a query at every key), dk and dv those of the full sequences with only these rows' outputs
    in the loss; in fp64."""
    pairs, hq, hkv, block_size, topk = SUFFIX_CASES[case]
    lq, lk = zip(*pairs, strict=True)
    q_full, k, v, cu_k = packed(lk, hq, hkv, seed=len(case))
    cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32)
    rows = torch.cat([torch.arange(end - n, end) for n, end in zip(lq, cu_k[1:].tolist(), strict=True)])
    do_full = torch.zeros_like(q_full)
    do_full[rows] = torch.randn(len(rows), hq, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    full = output_and_grads(q_full, k, v, do_full, cu_k, block_size, topk)
    suffix = output_and_grads(q_full[rows], k, v, do_full[rows], cu_q, block_size, topk, cu_k)
    for name, ours, theirs in zip(("o", "dq"), suffix[:2], full[:2], strict=True):
        torch.testing.assert_close(ours, theirs[rows], rtol=1e-10, atol=1e-12, msg=name)
    for name, ours, theirs in zip(("dk", "dv"), suffix[2:], full[2:], strict=True):
        assert theirs.abs().sum() > 0
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12, msg=name)
    # On the CPU the public op is the reference.
    assert torch.equal(moba_attention(q_full[rows], k, v, cu_q, block_size, topk, cu_k), suffix[0])


@pytest.mark.parametrize(
    "lq, lk, message",
    [
        ([4, 5], [10, 3], "sequence 1 has 5 queries but 3 keys"),
        ([4, 5], [10, 20], "cu_seqlens_k must rise from 0 to the 13 tokens"),
        ([4, 5], [13], "cu_seqlens_k has 1 sequences, cu_seqlens 2"),
    ],
)
def test_bad_suffix_layouts_are_refused(lq, lk, message):
    q, _, _, cu_q = packed(lq, 2, 2, seed=0)
    _, k, v, _ = packed([13], 2, 2, seed=0)
    cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32)
    with pytest.raises(ValueError, match=message):
        moba_reference(q, k, v, cu_q, 4, 2, cu_k)
    with pytest.raises(ValueError, match="k has 13 tokens and q 9"):
        moba_reference(q, k, v, cu_q, 4, 2)
