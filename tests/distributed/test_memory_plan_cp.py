"""The memory plan of a context-parallel rank: a model wrapped by `apply_cp` on 2 gloo ranks,
each running its shard of the same global batch, keeps within 10% of the activation bytes the
plan gives `ParallelDims(cp=2)`, for both styles and each attention path a CPU runs; a wrapped
attention op alone keeps within 2% of the plan's op term (no term hides in a model's 10%).
One spawn runs every case.

Shape legend: B rows, L positions of this rank, S of a row, H query heads, K key/value heads, d head dim."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from harness import run_distributed
from memory_probe import kept_bytes

from sparsetron.model.attention_ops import MobaAttention, full_attention
from sparsetron.model.config import AttentionConfig
from sparsetron.model.sequence import SequenceInfo
from sparsetron.model.sequence_shard import shard_sequence
from sparsetron.model.transformer import Transformer
from sparsetron.parallel.context_parallel import STYLES, apply_cp, shard_batch
from sparsetron.parallel.dims import ParallelDims
from sparsetron.parallel.memory import AttentionPaths, attention_op_bytes, memory_plan
from sparsetron.train.config_io import load_job_config

CP = 2
BATCH = 2
MOBA = ["data.seq_len=256", "attention.moba_block_size=32", "attention.document_masking=false"]
# name: recipe overrides
CASES = {
    "documents: dense-mask reference": ("tiny", []),
    "one sequence per row": ("tiny", ["attention.document_masking=false"]),
    "a k/v head per query head": ("debug-deepseek", []),
    "moba reference, hybrid": ("tiny-moba", MOBA),
}

# op: (MoBA, packed documents)
OPS = {"sdpa": (False, False), "dense reference": (False, True), "moba reference": (True, False)}
OP_SHAPE = dict(B=2, S=96, H=4, K=2, d=16)


def op_config(moba, documents):
    return AttentionConfig(
        n_heads=OP_SHAPE["H"],
        n_kv_heads=OP_SHAPE["K"],
        head_dim=OP_SHAPE["d"],
        document_masking=documents,
        backend="moba" if moba else "sdpa",
        moba_block_size=8,
        moba_topk=3,
    )


def build(name, overrides, seed=0):
    job = load_job_config(name, ["model.vocab_size=320", *overrides])
    torch.manual_seed(seed)
    model = Transformer(job.model, job.attention, job.moe)
    model.init_weights()
    return job, model


def rank_kept_bytes(name, overrides, style, seed):
    """What this rank's autograd keeps for its shard of a global batch (the same on every rank)."""
    job, model = build(name, overrides)
    apply_cp(model, dist.group.WORLD, style)
    g = torch.Generator().manual_seed(seed)
    S = job.data.seq_len
    tokens = torch.randint(0, 256, (BATCH, S), generator=g)
    doc_ids = ((torch.rand(BATCH, S, generator=g) < 0.03).long().cumsum(1)) if job.attention.document_masking else None
    local, targets, seq = shard_batch(tokens, tokens, model.sequence_info(tokens, doc_ids), dist.get_rank(), CP)

    def run():
        logits = model(local, seq)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    return kept_bytes(run, [*model.parameters(), *model.buffers()])


def op_kept_bytes(moba, documents, style, seed):
    """What a wrapped attention op alone keeps on this rank, its output kept as the output
    projection keeps it."""
    B, S, H, K, d = OP_SHAPE.values()
    op = STYLES[style](MobaAttention(8, 3) if moba else full_attention, dist.group.WORLD)
    g = torch.Generator().manual_seed(seed)
    doc_ids = (torch.rand(B, S, generator=g) < 0.1).long().cumsum(1) if documents else None
    seq = shard_sequence(SequenceInfo.build(B, S, doc_ids), dist.get_rank(), CP)
    L = S // CP
    q_BLHd = torch.randn(B, L, H, d, generator=g, requires_grad=True)
    k_BLKd, v_BLKd = (torch.randn(B, L, K, d, generator=g, requires_grad=True) for _ in range(2))
    w = torch.randn(B, L, H * d, generator=g, requires_grad=True)
    return kept_bytes(lambda: (op(q_BLHd, k_BLKd, v_BLKd, seq).reshape(w.shape) * w).sum(), [w])


def worker():
    models = {
        (case, style): rank_kept_bytes(name, overrides, style, seed=i)
        for i, (case, (name, overrides)) in enumerate(CASES.items())
        for style in STYLES
    }
    ops = {(op, style): op_kept_bytes(*OPS[op], style, seed=i) for i, op in enumerate(OPS) for style in STYLES}
    return models, ops


@pytest.fixture(scope="module")
def measured():
    return run_distributed(worker, CP, timeout=240)


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("case", list(CASES))
def test_a_context_rank_keeps_what_the_plan_says(measured, case, style):
    name, overrides = CASES[case]
    job, model = build(name, overrides)
    dims = ParallelDims(cp=CP, world_size=CP)
    paths = AttentionPaths(cp_style=style)
    estimate = memory_plan(
        model, job.model, job.attention, job.moe, dims, BATCH, job.data.seq_len, 4, False, paths=paths
    ).activation_bytes
    ranks = [models[case, style] for models, _ in measured]
    assert 1 / 1.1 <= estimate / max(ranks) <= 1.1, (estimate, ranks)  # the plan is the rank that keeps most


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("op", list(OPS))
def test_a_context_rank_op_keeps_what_the_plan_says(measured, op, style):
    moba, documents = OPS[op]
    B, S, _, _, d = OP_SHAPE.values()
    paths = AttentionPaths(cp_style=style)
    estimate = attention_op_bytes(moba, op_config(moba, documents), d * OP_SHAPE["H"], B, S, CP, 4, paths)
    ranks = [ops[op, style] for _, ops in measured]
    assert 1 / 1.02 <= estimate / max(ranks) <= 1.02, (estimate, ranks)
