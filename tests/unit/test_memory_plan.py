"""The memory plan: exact parameter, gradient and optimizer bytes; activations within 10% of
what autograd really keeps (measured with saved-tensor hooks), for each attention path that
runs in one process. tests/distributed/test_memory_plan_cp.py measures a context-parallel rank."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import sparsetron.model.attention_ops as attention_ops
from sparsetron.kernels.moba import moba_triton
from sparsetron.model.transformer import Transformer
from sparsetron.parallel.dims import ParallelDims
from sparsetron.parallel.memory import AttentionPaths, memory_plan
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


def plan(job, model, dims=SINGLE, batch=2, ac=False, in_flight=1, paths=CPU):
    return memory_plan(
        model, job.model, job.attention, job.moe, dims, batch, job.data.seq_len, 4, ac, in_flight, paths=paths
    )


def kept_storages(loss: torch.Tensor, storages: dict[int, int]) -> None:
    """Add to `storages` the tensors a custom autograd function keeps on its context outside
    save_for_backward (MoBA's block layout and gather lists: `ctx.meta`)."""
    seen, nodes = set(), [loss.grad_fn]
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for obj in getattr(node, "meta", ()):
            if dataclasses.is_dataclass(obj):
                for value in (getattr(obj, f.name) for f in dataclasses.fields(obj)):
                    if isinstance(value, torch.Tensor):
                        storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
        nodes.extend(next_node for next_node, _ in node.next_functions)


def saved_bytes(model, job, batch):
    """Bytes of the distinct storages autograd keeps for the backward (weights excluded)."""
    S = job.data.seq_len
    tokens = torch.randint(0, 256, (batch, S))
    doc_ids = torch.cumsum((torch.rand(batch, S) < 0.03).long(), dim=1)
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens, model.sequence_info(tokens, doc_ids))
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
    kept_storages(loss, storages)
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    return sum(n for ptr, n in storages.items() if ptr not in weights)


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("tiny", []),  # packed documents: the dense-mask reference, shared k/v heads repeated
        ("tiny", ["attention.document_masking=false"]),  # SDPA, causal
        ("debug-dense", []),
        ("debug-deepseek", []),  # one k/v head per query head
        ("debug-qwen-moe", []),  # qk-norm
        ("tiny-moba", MOBA),  # MoBA's reference, then a full-attention layer
    ],
)
def test_activation_estimate_is_within_10_percent_of_what_autograd_keeps(name, overrides):
    job, model = build(name, *overrides)
    measured = saved_bytes(model, job, batch=2)
    estimate = plan(job, model, batch=2).activation_bytes
    assert 1 / 1.1 <= estimate / measured <= 1.1, (estimate, measured)


def test_moba_reference_over_packed_documents_is_bounded_by_rows_as_sequences():
    # Documents shorter than the row keep the sum of their squared lengths, less than S^2.
    job, model = build("tiny-moba", *MOBA[:2], "attention.document_masking=true")
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
