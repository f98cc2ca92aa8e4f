"""Every parallel layout trains exactly like one process with the same global batch
(tests/distributed/training.py runs both). The first steps' losses agree within
1e-5 relative, and so do the gathered parameters after them (fp32; lr 1e-3 and eps 1e-6 keep
AdamW's first steps from magnifying the reduction-order rounding of near-zero gradients).
Checkpoints written at one layout resume at another.
"""

import pytest
import torch
from harness import run_distributed
from training import BF16, assert_same_training, bf16_tolerances, expert_loads, rms, single_process, train_worker

# name: (world size, data-parallel degree, overrides)
LAYOUTS = {
    "dp2": (2, 2, ["parallel.data_parallel_shard=2"]),
    "hsdp2x2": (4, 4, ["parallel.data_parallel_replicate=2", "parallel.data_parallel_shard=2"]),
    "tp2": (2, 1, ["parallel.tensor=2"]),
    "ep2": (2, 2, ["parallel.data_parallel_shard=2", "parallel.expert=2"]),
    "ep4": (4, 4, ["parallel.data_parallel_shard=4", "parallel.expert=4"]),
    "tp2xdp2": (4, 2, ["parallel.tensor=2", "parallel.data_parallel_shard=2"]),
    "ep2xtp2": (4, 2, ["parallel.tensor=2", "parallel.data_parallel_shard=2", "parallel.expert=2"]),
    "pp2-1f1b": (2, 1, ["parallel.pipeline=2"]),
    "pp2-interleaved_1f1b": (2, 1, ["parallel.pipeline=2", "parallel.pipeline_schedule=interleaved_1f1b"]),
    "pp2-zero_bubble": (2, 1, ["parallel.pipeline=2", "parallel.pipeline_schedule=zero_bubble"]),
    "pp2xep2": (4, 2, ["parallel.pipeline=2", "parallel.data_parallel_shard=2", "parallel.expert=2"]),
    "pp2xtp2": (4, 1, ["parallel.pipeline=2", "parallel.tensor=2"]),
}
# Layouts only checkpoints are resumed at.
RESUME_LAYOUTS = {"dp4": (4, 4, ["parallel.data_parallel_shard=4"])}
BALANCING = {
    "sequence-aux": [],  # the recipe: sequence-level aux loss and the auxiliary-loss-free bias
    "global-aux": ["moe.aux_loss_level=global", "moe.aux_loss_coeff=0.01"],
}


def run_layout(run_dir, layout, *overrides, resume=None):
    """Train at `layout` on its world size; (losses, eval losses, every parameter gathered,
    the expert loads rank 0 logged for the last step)."""
    world, dp, layout_overrides = {**LAYOUTS, **RESUME_LAYOUTS}[layout]
    results = run_distributed(
        train_worker, world, str(run_dir), dp, [*layout_overrides, *overrides], resume, timeout=300
    )
    params = {}
    for _, _, rank_params in results:  # pipeline stages each hold their own part
        params.update(rank_params)
    losses, eval_losses, _ = results[-1]  # the last rank holds the last stage
    assert all(r[0] == losses and r[1] == eval_losses for r in results), "ranks report different losses"
    return losses, eval_losses, params, expert_loads(run_dir)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process's run for each balancing setting, computed once for the module."""
    cache = {}

    def get(balancing, *overrides):
        key = (balancing, *overrides)
        if key not in cache:
            run_dir = tmp_path_factory.mktemp(f"single-{balancing}")
            cache[key] = single_process(run_dir, *BALANCING[balancing], *overrides)
        return cache[key]

    return get


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_trains_like_one_process(tmp_path, reference, layout):
    assert_same_training(run_layout(tmp_path, layout), reference("sequence-aux"))


@pytest.mark.parametrize("layout", ["hsdp2x2", "ep2xtp2"])
def test_global_aux_loss_counts_every_token_rank(tmp_path, reference, layout):
    assert_same_training(run_layout(tmp_path, layout, *BALANCING["global-aux"]), reference("global-aux"))


AC = "parallel.activation_checkpointing=full"
WRAPPED = {"ep2xtp2+ac+compile": ("ep2xtp2", [AC, "parallel.compile=true"]), "pp2xep2+ac": ("pp2xep2", [AC])}


@pytest.mark.parametrize("case", list(WRAPPED))
def test_composes_with_activation_checkpointing_and_compile(tmp_path, reference, case):
    layout, wrappers = WRAPPED[case]
    assert_same_training(run_layout(tmp_path, layout, *wrappers), reference("sequence-aux"))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_trains_like_one_process_in_bf16(tmp_path, reference, layout):
    """Every layout in bf16 (FSDP mixed precision where it shards, autocast everywhere, one
    policy: parallel/precision.py) against one process in bf16, within 2x bf16's own error.
    Measured (worst parameter / loss): 0.55-0.60 / <= 0.08 with FSDP, 1.34-1.45 / <= 0.11 with
    tensor parallelism (its ranks round partial sums to bf16 before reducing them), <= 0.01 for
    the pipelines alone. Deterministic on the CPU (fixed seeds, gloo)."""
    multiple = 2
    single, fp32 = reference("sequence-aux", *BF16), reference("sequence-aux")
    loss_tol, param_tol = bf16_tolerances(single, fp32)
    assert loss_tol > 0 and min(param_tol.values()) > 0  # bf16 did change every number
    losses, eval_losses, params, _ = run_layout(tmp_path, layout, *BF16)
    ref_losses, ref_eval, ref_params, _ = single
    assert losses.keys() == ref_losses.keys()
    for step, loss in ref_losses.items():
        assert abs(losses[step] - loss) <= multiple * loss_tol, (step, losses[step], loss, loss_tol)
    for step, loss in ref_eval.items():
        assert abs(eval_losses[step] - loss) <= multiple * loss_tol, (step, eval_losses[step], loss, loss_tol)
    assert params.keys() == ref_params.keys()
    for name, ref in ref_params.items():
        assert params[name].dtype == torch.float32, name  # master weights stay fp32
        error = rms(params[name] - ref)
        assert error <= multiple * param_tol[name], (name, error, param_tol[name])


# A checkpoint written at one layout (two steps) resumes at another for the third step.
RESHARDS = {
    "dp2->one process": ("dp2", None),
    "one process->dp2": (None, "dp2"),
    "ep2xtp2->dp4": ("ep2xtp2", "dp4"),
    "ep2->ep4": ("ep2", "ep4"),
    "pp2->one process": ("pp2-1f1b", None),
    "pp2xtp2->pp2-zero_bubble": ("pp2xtp2", "pp2-zero_bubble"),
}


@pytest.mark.parametrize("reshard", list(RESHARDS))
def test_checkpoint_resumes_at_another_layout(tmp_path, reference, reshard):
    before, after = RESHARDS[reshard]
    run_dir = tmp_path / "run"
    if before is None:
        single_process(run_dir, "trainer.stop_at=2")
    else:
        run_layout(run_dir, before, "trainer.stop_at=2")
    if after is None:
        resumed = single_process(run_dir, resume="auto")
    else:
        resumed = run_layout(run_dir, after, resume="auto")
    straight = reference("sequence-aux")
    assert resumed[0].keys() == {3}
    assert resumed[0][3] == pytest.approx(straight[0][3], rel=1e-5)
    for name, ref in straight[2].items():
        torch.testing.assert_close(resumed[2][name], ref, rtol=1e-5, atol=1e-5, msg=name)
