"""The memory plan: exact parameter, gradient and optimizer bytes; activations within 10% of
what autograd really keeps (measured with saved-tensor hooks), for each attention path that
runs in one process. tests/distributed/test_memory_plan_cp.py measures a context-parallel rank."""

import pytest
import torch
import torch.nn.functional as F
from memory_probe import kept_bytes

import sparsetron.model.attention_ops as attention_ops
from sparsetron.kernels.moba import moba_triton
from sparsetron.kernels.varlen import flash_varlen_available
from sparsetron.model.attention_ops import MobaAttention, full_attention
from sparsetron.model.config import AttentionConfig
from sparsetron.model.sequence import SequenceInfo
from sparsetron.model.sequence_shard import shard_sequence
from sparsetron.model.transformer import Transformer
from sparsetron.parallel.dims import ParallelDims
from sparsetron.parallel.memory import AttentionPaths, attention_op_bytes, memory_plan
from sparsetron.train.config_io import load_job_config

SINGLE = ParallelDims(world_size=1)
CPU = AttentionPaths()  # the references, as a CPU runs them
# Small MoBA models: rows of one sequence (the reference's [H, S, S] state is then exact), the
# last layer full attention (the hybrid setting).
MOBA = ["data.seq_len=256", "attention.moba_block_size=32", "attention.document_masking=false"]


def build(name, *overrides):
    job = load_job_config(name, ["model.vocab_size=320", *overrides])
    torch.manual_seed(0)
    model = Transformer(job.model, job.attention, job.moe)
    model.init_weights()
    return job, model


def plan(job, model, dims=SINGLE, batch=2, ac=False, in_flight=1, paths=CPU, dtype=torch.float32):
    S = job.data.seq_len
    return memory_plan(
        model, job.model, job.attention, job.moe, dims, batch, S, dtype.itemsize, ac, in_flight, paths=paths
    )


def saved_bytes(model, job, batch, dtype=torch.float32):
    """Bytes of the distinct storages autograd keeps for the backward (weights excluded), with
    the forward under autocast to `dtype` unless fp32 (parallel.precision's policy)."""
    S = job.data.seq_len
    tokens = torch.randint(0, 256, (batch, S))
    doc_ids = torch.cumsum((torch.rand(batch, S) < 0.03).long(), dim=1)

    def run():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = model(tokens, model.sequence_info(tokens, doc_ids))
        return F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())

    return kept_bytes(run, [*model.parameters(), *model.buffers()])


def op_kept_bytes(op, attn_cfg, B, S, cp, rank, device="cpu", dtype=torch.float32) -> int:
    """What one attention op keeps on all-gather cp rank `rank` (cp 1: the whole rows), with its
    output kept as the output projection keeps it: its queries local, the gathered keys whole."""
    H, K, d = attn_cfg.n_heads, attn_cfg.kv_heads(), 16
    doc_ids = (torch.rand(B, S, device=device) < 0.1).long().cumsum(1) if attn_cfg.document_masking else None
    seq = SequenceInfo.build(B, S, doc_ids, device=device)
    if cp > 1:
        seq = shard_sequence(seq, rank, cp)
    new = dict(device=device, dtype=dtype, requires_grad=True)
    q = torch.randn(B, S // cp, H, d, **new)
    k, v = (torch.randn(B, S, K, d, **new) for _ in range(2))
    w = torch.randn(B, S // cp, H * d, **new)
    return kept_bytes(lambda: (op(q, k, v, seq).reshape(w.shape) * w).float().sum(), [w])


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("tiny", []),  # packed documents: the dense-mask reference, shared k/v heads repeated
        ("tiny", ["attention.document_masking=false"]),  # SDPA, causal
        ("debug-dense", []),
        ("debug-deepseek", []),  # one k/v head per query head
        ("debug-qwen-moe", ["attention.qk_norm=true"]),  # qk-norm, q/k/v biases, a gated shared expert
        ("debug-qwen-moe", ["moe.shared_expert_hidden=2000"]),  # a shared expert of its own width
        ("debug-deepseek", ["moe.router_input=pre_attention"]),  # the router reads attention's input
        ("tiny-moba", MOBA),  # MoBA's reference, then a full-attention layer
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_estimate_is_within_10_percent_of_what_autograd_keeps(name, overrides, dtype):
    job, model = build(name, *overrides)
    measured = saved_bytes(model, job, batch=2, dtype=dtype)
    estimate = plan(job, model, batch=2, dtype=dtype).activation_bytes
    assert 1 / 1.1 <= estimate / measured <= 1.1, (estimate, measured)


def test_moba_reference_over_packed_documents_is_bounded_by_rows_as_sequences():
    # Documents shorter than the row keep the sum of their squared lengths, less than S^2.
    job, model = build("tiny-moba", "data.seq_len=128", "attention.moba_block_size=16")
    measured = saved_bytes(model, job, batch=2)
    assert measured < plan(job, model, batch=2).activation_bytes < 1.25 * measured


def test_moba_kernels_estimate_is_within_10_percent(monkeypatch):
    # The Triton kernels run interpreted on CPU tensors (TRITON_INTERPRET=1, tests/conftest.py):
    # what they keep is what they keep on CUDA.
    monkeypatch.setattr(attention_ops, "moba_attention", moba_triton)
    overrides = ["attention.backend=moba", "attention.moba_block_size=16", "attention.document_masking=false"]
    job, model = build("debug-dense", "model.n_layers=1", "data.seq_len=96", *overrides)
    measured = saved_bytes(model, job, batch=2)
    estimate = plan(job, model, batch=2, paths=AttentionPaths(moba_kernels=True)).activation_bytes
    assert 1 / 1.1 <= estimate / measured <= 1.1, (estimate, measured)


@pytest.mark.parametrize("cp", [1, 2, 3])
@pytest.mark.parametrize(
    "path", ["sdpa", "dense reference", "dense reference, one kv head per query head", "moba", "moba kernels"]
)
def test_attention_op_state_is_what_the_plan_says(path, cp, monkeypatch):
    # One op alone, so that no term of it hides in a whole model's 10%; cp > 1 as an all-gather
    # rank sees it (tests/distributed/test_memory_plan_cp.py runs both styles for real).
    moba = path.startswith("moba")
    kernels = path == "moba kernels"
    if kernels:
        monkeypatch.setattr(attention_ops, "moba_attention", moba_triton)
    attn_cfg = AttentionConfig(
        n_heads=4,
        n_kv_heads=4 if "one kv head" in path else 2,
        head_dim=16,
        document_masking=path.startswith("dense"),
        backend="moba" if moba else "sdpa",
        moba_block_size=8,
        moba_topk=3,
    )
    op = MobaAttention(8, 3) if moba else full_attention
    B, S = 2, 48
    measured = max(op_kept_bytes(op, attn_cfg, B, S, cp, rank) for rank in range(cp))
    estimate = attention_op_bytes(moba, attn_cfg, 64, B, S, cp, 4, AttentionPaths(moba_kernels=kernels))
    assert 1 / 1.02 <= estimate / measured <= 1.02, (estimate, measured)


@pytest.mark.gpu
@pytest.mark.parametrize("cp", [1, 2, 3])
@pytest.mark.parametrize("path", ["sdpa", "flash varlen", "moba kernels"])
def test_cuda_attention_op_state_is_what_the_plan_says(path, cp):
    # What a GPU runs in bf16: SDPA's flash kernel, FlashAttention's varlen kernel over documents
    # (all-gather chunks take it too), MoBA's Triton kernels with their real launch tiles.
    moba = path.startswith("moba")
    attn_cfg = AttentionConfig(
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        document_masking=path == "flash varlen",
        backend="moba" if moba else "sdpa",
        moba_block_size=16,
        moba_topk=3,
    )
    op = MobaAttention(16, 3) if moba else full_attention
    B, S = 2, 192
    measured = max(op_kept_bytes(op, attn_cfg, B, S, cp, rank, "cuda", torch.bfloat16) for rank in range(cp))
    paths = AttentionPaths(flash=flash_varlen_available("cuda", torch.bfloat16), moba_kernels=True)
    estimate = attention_op_bytes(moba, attn_cfg, 64, B, S, cp, 2, paths)
    assert 1 / 1.05 <= estimate / measured <= 1.05, (estimate, measured)


def test_an_unknown_context_style_is_refused():
    job, model = build("tiny")
    with pytest.raises(ValueError, match="ring"):
        plan(job, model, paths=AttentionPaths(cp_style="ring"))


def test_parameter_bytes_are_exact_and_tied_weights_count_once():
    job, model = build("debug-deepseek", "model.tie_embeddings=true")
    elements = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    p = plan(job, model)
    assert p.parameters == elements
    assert (p.parameter_bytes, p.gradient_bytes, p.optimizer_bytes) == (4 * elements, 4 * elements, 8 * elements)


def test_a_pipeline_stage_counts_only_what_it_holds():
    job, model = build("debug-dense")
    whole = plan(job, model)
    model.tok_embeddings = None
    model.layers["0"] = None
    rest = plan(job, model)
    assert rest.parameters == sum(p.numel() for p in model.parameters()) < whole.parameters
    assert rest.activation_bytes < whole.activation_bytes
    assert plan(job, model, in_flight=2).activation_bytes == 2 * rest.activation_bytes


def test_activation_checkpointing_keeps_less():
    job, model = build("tiny")
    assert plan(job, model, ac=True).activation_bytes < 0.6 * plan(job, model).activation_bytes
