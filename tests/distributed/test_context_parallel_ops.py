"""The context-parallel attention wrappers (parallel/context_parallel.py) over real process
groups: on every rank, the wrapped op on the rank's shard gives the whole op's rows of that
rank, and the q, k, v gradients of the shard are the whole's (fp64, so anything beyond
summation order fails). One spawn per world size runs every case.

Shape legend: B rows, S positions, H query heads, K key/value heads, d head dim.
"""

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed

from sparsetron.model.attention_ops import MobaAttention, full_attention
from sparsetron.model.sequence import SequenceInfo
from sparsetron.parallel.context_parallel import STYLES, shard_batch

H, K, D = 8, 4, 8

# name: (op, sequence length, document-start probability or None for one sequence per row)
CASES = {
    "full, documents": (full_attention, 48, 0.1),
    "full, one sequence per row": (full_attention, 48, None),
    "moba 4 top 3, documents": (MobaAttention(4, 3), 48, 0.05),
    "moba K = 1": (MobaAttention(4, 1), 48, None),
    "moba, documents shorter than a block": (MobaAttention(8, 2), 48, 0.3),
}


def whole_and_shard(op, S, p, style, seed):
    """(worst relative error of the output, of dq, dk, dv) on this rank."""
    cp, rank = dist.get_world_size(), dist.get_rank()
    g = torch.Generator().manual_seed(seed)
    B = 2
    q, k, v = (torch.randn(B, S, h, D, generator=g, dtype=torch.float64) for h in (H, K, K))
    do = torch.randn(B, S, H, D, generator=g, dtype=torch.float64)
    doc_ids = (torch.rand(B, S, generator=g) < p).long().cumsum(1) if p is not None else None
    whole = SequenceInfo.build(B, S, doc_ids)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o = op(*leaves, whole)
    o.backward(do)

    _, _, seq = shard_batch(torch.zeros(B, S, dtype=torch.long), torch.zeros(B, S, dtype=torch.long), whole, rank, cp)
    index = seq.context.index_S
    shards = [t[:, index].clone().requires_grad_() for t in (q, k, v)]
    o_r = STYLES[style](op, dist.group.WORLD)(*shards, seq)
    o_r.backward(do[:, index])
    pairs = [(o_r, o), *((s.grad, leaf.grad) for s, leaf in zip(shards, leaves, strict=True))]
    return [
        ((mine.detach() - ref.detach()[:, index]).abs().max() / ref.detach().abs().max()).item() for mine, ref in pairs
    ]


def styles(cp):
    """Ulysses needs the heads divisible by cp; the all-gather style takes any cp."""
    return [style for style in STYLES if style == "allgather" or (H % cp == 0 and K % cp == 0)]


def ops_worker():
    return {
        (name, style): whole_and_shard(op, S, p, style, seed=i)
        for i, (name, (op, S, p)) in enumerate(CASES.items())
        for style in styles(dist.get_world_size())
    }


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_wrapped_ops_on_shards_equal_the_whole_op(cp):
    results = run_distributed(ops_worker, cp, timeout=240)
    for rank, errors in enumerate(results):
        assert errors.keys() == {(name, style) for name in CASES for style in styles(cp)}
        for case, errs in errors.items():
            # fp64: equal but for summation order (output, dq, dk, dv).
            assert max(errs) < 1e-12, (rank, case, errs)
