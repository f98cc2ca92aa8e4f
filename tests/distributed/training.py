"""Training runs the distributed layout tests compare: a small MoE recipe, trained a few steps
at a layout on spawned ranks or in one process, and the comparisons between them.

One process reads micro-batches of GLOBAL_BATCH sequences; a layout with `dp` data ranks
gives each GLOBAL_BATCH / dp of them (their slices of the same global batch), and its tensor,
expert, context and pipeline ranks share their data rank's slice.
"""

import json
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor

from sparsetron.train.config_io import load_job_config
from sparsetron.train.trainer import Trainer

STEPS = 3
GLOBAL_BATCH = 4
BF16 = ["trainer.precision=bf16"]  # what a GPU runs by default (precision auto)


def job(run_dir, dp, *overrides):
    # Evaluation reads eval_batches micro-batches on every rank: dp of GLOBAL_BATCH / dp
    # sequences, one of GLOBAL_BATCH in one process, so both evaluate the same sequences.
    return load_job_config(
        "debug-deepseek",
        [
            "model.n_layers=4",
            f"trainer.steps={STEPS}",
            f"trainer.micro_batch_size={GLOBAL_BATCH // dp}",
            "trainer.grad_accum_steps=2",
            "trainer.eval_interval=0",
            f"trainer.eval_batches={dp}",
            "schedule.warmup_steps=1",
            "optimizer.lr=1e-3",
            "optimizer.eps=1e-6",
            "checkpoint.interval=2",
            "metrics.console=none",
            f"trainer.run_dir={run_dir}",
            *overrides,
        ],
    )


def full_parameters(model):
    """Every parameter this rank's model holds, gathered whole (a collective within its stage)."""
    return {
        # Activation checkpointing's wrapper adds a prefix to names (not to state-dict keys).
        name.replace("_checkpoint_wrapped_module.", ""): (p.full_tensor() if isinstance(p, DTensor) else p)
        .detach()
        .clone()
        for name, p in model.named_parameters()
    }


def train_worker(run_dir, dp, overrides, resume=None):
    trainer = Trainer(job(run_dir, dp, *overrides), resume=resume)
    result = trainer.run()
    # The plan counts exactly what this rank holds.
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in trainer.model.parameters())
    assert trainer.memory_plan.parameters == local, (trainer.memory_plan.parameters, local)
    return result.losses, result.eval_losses, full_parameters(trainer.model)


def expert_loads(run_dir):
    """Tokens per expert of every MoE layer in the last step rank 0 logged (metrics.jsonl)."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "loss" in r][-1]
    return {key: value for key, value in last.items() if key.endswith("tokens_per_expert")}


def single_process(run_dir, *overrides, resume=None):
    trainer = Trainer(job(run_dir, 1, *overrides), resume=resume)
    result = trainer.run()
    return result.losses, result.eval_losses, full_parameters(trainer.model), expert_loads(run_dir)


def assert_same_training(parallel, single):
    losses, eval_losses, params, loads = parallel
    ref_losses, ref_eval, ref_params, ref_loads = single
    # Every layer's expert load summed over all ranks, whichever stage holds the layer, as one process counts it.
    assert loads == ref_loads and len(ref_loads) == 3
    assert losses.keys() == ref_losses.keys()
    for step, loss in ref_losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), step
    for step, loss in ref_eval.items():
        assert eval_losses[step] == pytest.approx(loss, rel=1e-5), step
    assert params.keys() == ref_params.keys()
    for name, ref in ref_params.items():
        torch.testing.assert_close(params[name], ref, rtol=1e-5, atol=1e-5, msg=name)


def rms(t):
    return t.double().square().mean().sqrt().item()


def bf16_tolerances(bf16, fp32):
    """What bf16 itself costs, from one process: the largest change of any step's loss, and the
    root-mean-square change of each parameter after the steps, between a bf16 and an fp32 run.
    A layout in bf16 may differ from one process in bf16 by reduction order and rounding, never by
    more than a small multiple of this. (Per parameter, not per element: AdamW's first steps move
    an element by about lr x the sign of its gradient, so rounding that flips a near-zero gradient
    moves that element by 2 lr in any run; a mean over the tensor is what rounding sets.)"""
    losses, _, params, _ = bf16
    ref_losses, _, ref_params, _ = fp32
    loss_tol = max(abs(losses[step] - ref_losses[step]) for step in ref_losses)
    param_tol = {name: rms(params[name] - ref) for name, ref in ref_params.items()}
    return loss_tol, param_tol
