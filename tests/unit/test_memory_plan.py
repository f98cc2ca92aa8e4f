"""The memory plan: exact parameter, gradient and optimizer bytes; activations close to what
autograd really keeps (measured with saved-tensor hooks)."""

import pytest
import torch
import torch.nn.functional as F

from sparsetron.model.transformer import Transformer
from sparsetron.parallel.dims import ParallelDims
from sparsetron.parallel.memory import memory_plan
from sparsetron.train.config_io import load_job_config

SINGLE = ParallelDims(world_size=1)


def build(name, *overrides):
    job = load_job_config(name, ["model.vocab_size=320", *overrides])
    torch.manual_seed(0)
    model = Transformer(job.model, job.attention, job.moe)
    model.init_weights()
    return job, model


def plan(job, model, dims=SINGLE, batch=2, ac=False, in_flight=1):
    return memory_plan(model, job.model, job.attention, job.moe, dims, batch, job.data.seq_len, 4, ac, in_flight)


def saved_bytes(model, job, batch):
    """Bytes of the distinct storages autograd saves for the backward (weights excluded)."""
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
        F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    return sum(n for ptr, n in storages.items() if ptr not in weights)


@pytest.mark.parametrize("name", ["tiny", "debug-dense", "debug-deepseek", "debug-qwen-moe"])
def test_activation_estimate_is_close_to_what_autograd_keeps(name):
    job, model = build(name)
    measured = saved_bytes(model, job, batch=2)
    estimate = plan(job, model, batch=2).activation_bytes
    assert 1 / 1.25 <= estimate / measured <= 1.25, (estimate, measured)


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
