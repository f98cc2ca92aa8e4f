"""Pipeline parallelism trains exactly like one process with gradient accumulation.

Two ranks run a small MoE transformer (a dense first block, shared expert, sequence-level aux
loss, z-loss, expert-bias balancing, document masking on) under each schedule. Every rank also
builds the one-process model from the same seed; the pipelined parameters start bitwise equal to
it, and over two SGD steps on fresh random micro-batches the losses, the gradient norm over all
stages, every parameter's gradient (clipped in the second step) and the evaluation loss agree
within 1e-5. With four ranks, FSDP2 shards each stage over two data ranks.
"""

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed
from torch.distributed.tensor import DTensor

from sparsetron.model.config import AttentionConfig, ModelConfig, MoEConfig
from sparsetron.model.moe.balancing import set_aux_loss_scale, update_expert_bias
from sparsetron.model.transformer import Transformer
from sparsetron.parallel.config import ParallelConfig
from sparsetron.parallel.dims import ParallelDims
from sparsetron.parallel.fsdp import apply_fsdp
from sparsetron.parallel.init import SingleProcessInit
from sparsetron.parallel.pipeline import pipeline_split
from sparsetron.parallel.precision import FP32, cross_entropy
from sparsetron.parallel.step import StepRunner
from sparsetron.train.data import Batch

MICRO_BATCH = 2
SEQ = 16
VOCAB = 64
STEPS = 2
LR = 0.5  # SGD: large enough that step 2 runs on visibly moved weights


def configs():
    model = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=4, ffn_hidden=64, max_seq_len=32)
    attention = AttentionConfig(n_heads=4, n_kv_heads=2, document_masking=True)
    moe = MoEConfig(
        num_experts=4,
        top_k=2,
        n_shared_experts=1,
        first_k_dense=1,
        aux_loss_coeff=0.01,
        aux_loss_level="sequence",
        z_loss_coeff=1e-3,
        bias_update_rate=1e-3,
    )
    return model, attention, moe


def one_process_model(seed):
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(*configs())
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights()
    return model


def batch(step, rows):
    """Every rank draws the same tokens; documents are runs of random length."""
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (rows, SEQ), generator=g)
    targets = torch.randint(0, VOCAB, (rows, SEQ), generator=g)
    doc_ids = (torch.rand(rows, SEQ, generator=g) < 0.15).long().cumsum(dim=1)
    return tokens, targets, doc_ids


def pipeline_worker(cases, dp, seed):
    """Each (schedule, micro-batches) case on pp = world / dp ranks, FSDP over dp (one spawn for
    all cases: starting processes costs more than the cases)."""
    pp = dist.get_world_size() // dp
    mesh = ParallelDims(pp=pp, dp_shard=dp, world_size=pp * dp).build_mesh("cpu")
    return {case: train_and_compare(mesh, *case, seed) for case in cases}


def train_and_compare(mesh, schedule, n_microbatches, seed):
    """Train STEPS steps; return losses, eval loss and gradient errors next to one process's."""
    pp, dp = mesh.dims.pp, mesh.dims.dp
    pp_rank, dp_rank = mesh["pp"].get_local_rank(), mesh["dp"].get_local_rank()
    reference = one_process_model(seed)

    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(*configs())
    cfg = ParallelConfig(pipeline=pp, data_parallel_shard=dp, pipeline_schedule=schedule)
    split = pipeline_split(model, cfg, pp_rank, pp, SEQ)
    if dp > 1:
        for stage in split.stages:
            apply_fsdp(stage, mesh)
    model.to_empty(device="cpu")
    with torch.no_grad(), split.whole_model(model), SingleProcessInit():
        model.init_weights()
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(full(p), ref_params[name]), f"{name} differs from the one-process init"

    set_aux_loss_scale(reference, 1.0 / (n_microbatches * dp))
    runner = StepRunner(model, split, mesh, mesh.dims, FP32, n_microbatches, MICRO_BATCH, SEQ, torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=LR)

    losses, ref_losses, grad_errors, norms = [], [], [], []
    rows = n_microbatches * MICRO_BATCH
    for step in range(STEPS):
        # One process reads every data rank's micro-batches, in rank order.
        tokens, targets, doc_ids = batch(step, dp * rows)
        parts = [slice(mb * MICRO_BATCH, (mb + 1) * MICRO_BATCH) for mb in range(n_microbatches * dp)]
        micro_batches = [Batch(tokens[p], targets[p], doc_ids[p]) for p in parts]
        mine = micro_batches[dp_rank * n_microbatches : (dp_rank + 1) * n_microbatches]
        # Step 0 measures the norm; step 1 clips to a tenth of it, before the gradients are compared.
        max_norm = 0.0 if step == 0 else 0.1 * norms[0][1]
        loss, norm = runner.train_step(mine, max_norm)
        losses.append(loss)
        total = 0.0
        for mb in micro_batches:
            mb_loss = cross_entropy(reference(mb.tokens, reference.sequence_info(mb.tokens, mb.doc_ids)), mb.targets)
            (mb_loss / len(micro_batches)).backward()
            total += mb_loss.item()
        ref_losses.append(total / len(micro_batches))
        ref_grads = [p.grad for p in reference.parameters()]
        ref_norm = torch.nn.utils.get_total_norm(ref_grads)
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(reference.parameters(), max_norm, ref_norm)
        norms.append((norm, ref_norm.item()))
        ref_params = dict(reference.named_parameters())
        for name, p in model.named_parameters():
            grad, ref = full(p.grad), ref_params[name].grad
            grad_errors.append((step, name, ((grad - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()))
        optimizer.step()
        runner.close_step(applied=True)
        ref_optimizer.step()
        update_expert_bias(reference)
        optimizer.zero_grad(set_to_none=True)
        ref_optimizer.zero_grad(set_to_none=True)

    tokens, targets, doc_ids = batch(STEPS, 3)  # any number of rows
    with torch.no_grad():
        ref_eval = cross_entropy(reference(tokens, reference.sequence_info(tokens, doc_ids)), targets).item()
    eval_loss = runner.eval_loss([Batch(tokens, targets, doc_ids)])
    return losses, ref_losses, eval_loss, ref_eval, grad_errors, norms


def full(tensor):
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def assert_same_training(results, cases):
    for case in cases:
        for rank, by_case in enumerate(results):
            losses, ref_losses, eval_loss, ref_eval, grad_errors, norms = by_case[case]
            where = f"{case} on rank {rank}"
            assert losses == pytest.approx(ref_losses, rel=1e-5), where
            for norm, ref_norm in norms:
                assert norm == pytest.approx(ref_norm, rel=1e-5), where
            assert eval_loss == pytest.approx(ref_eval, rel=1e-5), where
            worst = max(grad_errors, key=lambda e: e[2])
            assert worst[2] < 1e-5, (where, worst)
        # Between them the ranks hold every parameter, each once per data-parallel rank.
        held = sorted(name for by_case in results for step, name, _ in by_case[case][4] if step == 0)
        names = [name for name, _ in one_process_model(0).named_parameters()]
        assert held == sorted(names * (len(results) // 2)), case


def test_schedules_train_like_one_process():
    """pp 2; micro-batches: 1f1b needs >= pp, interleaved_1f1b runs 2 rounds of pp, ZBV takes any."""
    cases = [("1f1b", 3), ("interleaved_1f1b", 4), ("zero_bubble", 3)]
    assert_same_training(run_distributed(pipeline_worker, 2, cases, 1, 7, timeout=180), cases)


def test_fsdp_stages_train_like_one_process():
    """pp 2 x data_parallel_shard 2: each stage module sharded by FSDP2 over its data ranks."""
    cases = [("1f1b", 2), ("interleaved_1f1b", 2), ("zero_bubble", 2)]
    assert_same_training(run_distributed(pipeline_worker, 4, cases, 2, 11, timeout=240), cases)
