"""Data parallelism (FSDP2, HSDP) trains exactly like one process with the same global batch.

One process reads micro-batches of B*W sequences; W ranks read B each (their slices of
the same global batch). The first steps' losses agree within 1e-5 relative, and so do the
gathered parameters after them (fp32; lr 1e-3 and eps 1e-6 keep AdamW's first steps from
magnifying the reduction-order rounding of near-zero gradients). A checkpoint written by
two ranks resumes in one process.
"""

import pytest
import torch
from harness import run_distributed
from torch.distributed.tensor import DTensor

from sparsetron.train.config_io import load_job_config
from sparsetron.train.trainer import Trainer

STEPS = 3
PER_RANK_BATCH = 2


def job(run_dir, micro_batch_size, eval_batches, *overrides):
    return load_job_config(
        "debug-deepseek",
        [
            f"trainer.steps={STEPS}",
            f"trainer.micro_batch_size={micro_batch_size}",
            "trainer.grad_accum_steps=2",
            "trainer.eval_interval=0",
            f"trainer.eval_batches={eval_batches}",
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
    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for name, p in model.named_parameters()
    }


def train_worker(run_dir, overrides, resume=None):
    # Evaluation reads eval_batches micro-batches on every rank: W of B sequences here, one
    # of B*W in the single process, so both evaluate the same sequences.
    world = torch.distributed.get_world_size()
    trainer = Trainer(job(run_dir, PER_RANK_BATCH, world, *overrides), resume=resume)
    result = trainer.run()
    params = full_parameters(trainer.model)  # a collective: every rank takes part
    if torch.distributed.get_rank() != 0:
        return None
    # Rank 0 holds the largest dim-0 shard of every parameter: what the memory plan counts.
    local = sum(p.to_local().numel() for p in trainer.model.parameters())
    assert trainer.memory_plan.parameters == local, (trainer.memory_plan.parameters, local)
    return result.losses, result.eval_losses, params


def single_process(run_dir, world, *overrides, resume=None):
    trainer = Trainer(job(run_dir, PER_RANK_BATCH * world, 1, *overrides), resume=resume)
    result = trainer.run()
    return result.losses, result.eval_losses, full_parameters(trainer.model)


def assert_same_training(parallel, single):
    losses, eval_losses, params = parallel
    ref_losses, ref_eval, ref_params = single
    assert losses.keys() == ref_losses.keys()
    for step, loss in ref_losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), step
    for step, loss in ref_eval.items():
        assert eval_losses[step] == pytest.approx(loss, rel=1e-5), step
    for name, ref in ref_params.items():
        torch.testing.assert_close(params[name], ref, rtol=1e-5, atol=1e-5, msg=name)


LAYOUTS = {
    "dp2": (2, ["parallel.data_parallel_shard=2"]),
    "hsdp2x2": (4, ["parallel.data_parallel_replicate=2", "parallel.data_parallel_shard=2"]),
}
BALANCING = {
    "sequence-aux": [],  # the recipe: sequence-level aux loss and the auxiliary-loss-free bias
    "global-aux": ["moe.aux_loss_level=global", "moe.aux_loss_coeff=0.01"],
}


@pytest.mark.parametrize("balancing", list(BALANCING))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_trains_like_one_process(tmp_path, layout, balancing):
    world, layout_overrides = LAYOUTS[layout]
    overrides = [*layout_overrides, *BALANCING[balancing]]
    parallel = run_distributed(train_worker, world, str(tmp_path / "parallel"), overrides, timeout=240)[0]
    single = single_process(tmp_path / "single", world, *BALANCING[balancing])
    assert_same_training(parallel, single)


def test_two_rank_checkpoint_resumes_in_one_process(tmp_path):
    run_distributed(
        train_worker, 2, str(tmp_path / "run"), ["parallel.data_parallel_shard=2", "trainer.stop_at=2"], timeout=240
    )
    resumed = single_process(tmp_path / "run", 2, resume="auto")
    straight = single_process(tmp_path / "straight", 2)
    assert resumed[0].keys() == {3}
    assert resumed[0][3] == pytest.approx(straight[0][3], rel=1e-5)
    for name, ref in straight[2].items():
        torch.testing.assert_close(resumed[2][name], ref, rtol=1e-5, atol=1e-5, msg=name)


def test_one_process_checkpoint_resumes_on_two_ranks(tmp_path):
    single_process(tmp_path / "run", 2, "trainer.stop_at=2")
    # Rank 1 finds no train state of its own and takes rank 0's (the data position is global).
    resumed = run_distributed(
        train_worker, 2, str(tmp_path / "run"), ["parallel.data_parallel_shard=2"], "auto", timeout=240
    )[0]
    straight = single_process(tmp_path / "straight", 2)
    assert resumed[0].keys() == {3}
    assert resumed[0][3] == pytest.approx(straight[0][3], rel=1e-5)
    for name, ref in straight[2].items():
        torch.testing.assert_close(resumed[2][name], ref, rtol=1e-5, atol=1e-5, msg=name)
