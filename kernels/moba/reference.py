"""MoBA (Mixture of Block Attention) in plain torch: the oracle every kernel is tested against.

Follows ../shared/specs/moba.md step by step, one packed sequence at a time, with dense
[Hq, Lq, L] masks: simple and exact, O(L^2) memory, meant for tests and CPU runs.

Shape legend: Tq / Tk packed query / key tokens, Hq query heads, Hkv key/value heads, D head
dim, L keys of one sequence, Lq its queries (the last Lq of the L positions), n its blocks (the
last one may be partial), B block size, K blocks per query.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def moba_selection(
    q_LHD: torch.Tensor, k_LHD: torch.Tensor, block_size: int, topk: int, query_offset: int = 0
) -> torch.Tensor:
    """Which blocks each query of one sequence reads: bool [Hq, Lq, n] (spec steps 1-5).

    `q_LHD` holds the Lq queries at positions query_offset .. query_offset + Lq - 1 of the L keys
    of `k_LHD`, already expanded to the query heads. The gate is fp32, without scale or softmax;
    it decides the mask only, so nothing here carries a gradient.
    """
    L, H, D = k_LHD.shape
    Lq = q_LHD.shape[0]
    n = -(-L // block_size)
    block_L = torch.arange(L, device=q_LHD.device) // block_size
    # kbar_j: the mean key of block j (a partial last block averages what it has), in fp32.
    sums_nHD = torch.zeros(n, H, D, dtype=torch.float32, device=q_LHD.device).index_add_(0, block_L, k_LHD.float())
    sizes_n = torch.bincount(block_L, minlength=n).to(torch.float32)
    kbar_nHD = sums_nHD / sizes_n.view(n, 1, 1)
    gate_HLn = torch.einsum("lhd,nhd->hln", q_LHD.float(), kbar_nHD)
    t_L1 = torch.arange(query_offset, query_offset + Lq, device=q_LHD.device).view(Lq, 1)
    j_1n = torch.arange(n, device=q_LHD.device).view(1, n)
    # Current and future blocks are out; then the current block is forced in.
    gate_HLn = gate_HLn.masked_fill(t_L1 < (j_1n + 1) * block_size, float("-inf"))
    gate_HLn = gate_HLn.masked_fill(j_1n == t_L1 // block_size, float("inf"))
    picked = gate_HLn.topk(min(topk, n), dim=-1)
    chosen_HLn = torch.zeros(H, Lq, n, dtype=torch.bool, device=q_LHD.device)
    # A -inf pick (fewer past blocks than K - 1) selects nothing.
    return chosen_HLn.scatter_(-1, picked.indices, picked.values != float("-inf"))


def _bounds(cu: torch.Tensor, n_tokens: int, name: str) -> list[int]:
    bounds = cu.tolist()
    if (
        bounds[0] != 0
        or bounds[-1] != n_tokens
        or any(nxt < prev for prev, nxt in zip(bounds, bounds[1:], strict=False))
    ):
        raise ValueError(f"{name} must rise from 0 to the {n_tokens} tokens, got {bounds}")
    return bounds


def moba_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    block_size: int,
    topk: int,
    cu_seqlens_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """MoBA attention of packed sequences: q [Tq, Hq, D], k and v [Tk, Hkv, D], cu_seqlens [S+1]
    int32 boundaries of q (FlashAttention's varlen layout), cu_seqlens_k [S+1] those of k (None:
    the same as cu_seqlens) -> o [Tq, Hq, D] in q's dtype.

    The Lq queries of a sequence are the last Lq of its L keys (bottom-right causal alignment).
    Causal; query head h reads KV head h // (Hq / Hkv). Each query attends, with one joint
    softmax at scale D^-1/2, to the keys u <= t of its selected blocks: its current block and
    the top K - 1 fully past blocks by q . mean(k of the block), blocks counted from the
    sequence's first key. Differentiable in q, k and v as dense attention under that fixed mask.
    """
    if block_size < 1 or topk < 1:
        raise ValueError(f"MoBA needs block_size >= 1 and topk >= 1, got {block_size} and {topk}")
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} must be a multiple of key/value heads {Hkv}")
    if cu_seqlens_k is None and k.shape[0] != T:
        raise ValueError(f"k has {k.shape[0]} tokens and q {T}: keys of another length need cu_seqlens_k")
    q_bounds = _bounds(cu_seqlens, T, "cu_seqlens")
    k_bounds = q_bounds if cu_seqlens_k is None else _bounds(cu_seqlens_k, k.shape[0], "cu_seqlens_k")
    if len(k_bounds) != len(q_bounds):
        raise ValueError(f"cu_seqlens_k has {len(k_bounds) - 1} sequences, cu_seqlens {len(q_bounds) - 1}")
    for s in range(len(q_bounds) - 1):
        Lq, L = q_bounds[s + 1] - q_bounds[s], k_bounds[s + 1] - k_bounds[s]
        if Lq > L:
            raise ValueError(f"sequence {s} has {Lq} queries but {L} keys: its queries must be the last of its keys")
    groups = Hq // Hkv
    scale = D**-0.5
    # Attention in fp32 (fp64 stays fp64, for tests); the gate is fp32 whatever the input, as specified.
    acc = torch.promote_types(q.dtype, torch.float32)
    outputs = []
    for q_start, q_end, k_start, k_end in zip(q_bounds[:-1], q_bounds[1:], k_bounds[:-1], k_bounds[1:], strict=True):
        Lq, L = q_end - q_start, k_end - k_start
        if Lq == 0:
            continue
        q_LHD = q[q_start:q_end]
        k_LHD = k[k_start:k_end].repeat_interleave(groups, dim=1)
        v_LHD = v[k_start:k_end].repeat_interleave(groups, dim=1)
        chosen_HLn = moba_selection(q_LHD, k_LHD, block_size, topk, L - Lq)
        block_L = torch.arange(L, device=q.device) // block_size
        causal_LL = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()[L - Lq :]
        allowed_HLL = chosen_HLn[:, :, block_L] & causal_LL
        scores_HLL = torch.einsum("thd,uhd->htu", q_LHD.to(acc), k_LHD.to(acc)) * scale
        probs_HLL = torch.softmax(scores_HLL.masked_fill(~allowed_HLL, float("-inf")), dim=-1)
        outputs.append(torch.einsum("htu,uhd->thd", probs_HLL, v_LHD.to(acc)).to(q.dtype))
    return torch.cat(outputs) if outputs else q.new_zeros(0, Hq, D)
