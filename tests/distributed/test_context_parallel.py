"""Context parallelism trains exactly like one process with the same global batch, in both
styles and composed with every other layout; checkpoints move between cp degrees.

The recipe of tests/distributed/training.py (MoE with a sequence-level auxiliary loss and the
loss-free bias, documents packed and masked) at 64 tokens; its MoBA variant runs blocks of 8,
top 2, the last layer full attention (the paper's hybrid). fp32 within 1e-5 relative (losses,
evaluation losses, every parameter after the steps, expert loads exact); bf16 within 2x bf16's
own error. Every layout of one world size trains in one spawn (one Trainer after another on
the same process group), which keeps this tier to about a minute on two cores.
"""

import pytest
from harness import run_distributed
from training import (
    BF16,
    assert_same_training,
    bf16_tolerances,
    expert_loads,
    rms,
    single_process,
    train_worker,
)

CP2 = ["parallel.context=2"]
ULYSSES = ["parallel.context_style=ulysses"]
AC = "parallel.activation_checkpointing=full"
MODELS = {
    "recipe": [],
    "unmasked": ["attention.document_masking=false"],
    "moba-hybrid": [
        "attention.backend=moba",
        "attention.moba_block_size=8",
        "attention.moba_topk=2",
        "attention.moba_full_last=1",
    ],
}

# name: (world size, data-parallel degree, model, overrides)
LAYOUTS = {
    "cp2": (2, 1, "recipe", CP2),
    "cp2-ulysses": (2, 1, "recipe", [*CP2, *ULYSSES]),
    "cp2-unmasked": (2, 1, "unmasked", CP2),
    "cp2-moba-hybrid": (2, 1, "moba-hybrid", CP2),
    "cp2-ulysses-moba-hybrid": (2, 1, "moba-hybrid", [*CP2, *ULYSSES]),
    "cp2xep2": (2, 1, "recipe", [*CP2, "parallel.expert=2"]),
    "cp2+ac": (2, 1, "recipe", [*CP2, AC]),
    "cp4": (4, 1, "recipe", ["parallel.context=4"]),
    "cp4-ulysses-moba-hybrid": (4, 1, "moba-hybrid", ["parallel.context=4", *ULYSSES]),
    "cp2xtp2": (4, 1, "recipe", [*CP2, "parallel.tensor=2"]),
    "cp2xdp2": (4, 2, "recipe", [*CP2, "parallel.data_parallel_shard=2"]),
    "cp2xpp2": (4, 1, "recipe", [*CP2, "parallel.pipeline=2"]),
    "cp2xtp2-ulysses+ac": (4, 1, "recipe", [*CP2, "parallel.tensor=2", *ULYSSES, AC]),
}
BF16_LAYOUTS = {
    "cp2-bf16": (2, 1, "recipe", [*CP2, *BF16]),
    "cp2xtp2-bf16": (4, 1, "recipe", [*CP2, "parallel.tensor=2", *BF16]),
}


def several_worker(runs):
    """Train each (run_dir, dp, overrides, resume) in turn on this process group."""
    results = []
    for run_dir, dp, overrides, resume in runs:
        losses, eval_losses, params = train_worker(run_dir, dp, overrides, resume)
        results.append((losses, eval_losses, params))
    return results


def merged(per_rank, run_dir):
    """One layout's result from its ranks' (losses, eval losses, parameters gathered whole)."""
    params = {}
    for _, _, rank_params in per_rank:  # pipeline stages each hold their own part
        params.update(rank_params)
    losses, eval_losses, _ = per_rank[-1]  # the last rank holds the last stage
    assert all(r[0] == losses and r[1] == eval_losses for r in per_rank), "ranks report different losses"
    return losses, eval_losses, params, expert_loads(run_dir)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    cache = {}

    def get(model, *overrides):
        key = (model, *overrides)
        if key not in cache:
            cache[key] = single_process(tmp_path_factory.mktemp("single"), *MODELS[model], *overrides)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def trained(tmp_path_factory, single):
    """Every layout of LAYOUTS and BF16_LAYOUTS trained, and the checkpoint moves between cp 2 and
    one process: one spawn per world size, on first use."""
    cache = {}
    layouts = {**LAYOUTS, **BF16_LAYOUTS}

    def get(world):
        if world not in cache:
            names = [name for name, (w, *_) in layouts.items() if w == world]
            runs = []
            for name in names:
                _, dp, model, overrides = layouts[name]
                runs.append((str(tmp_path_factory.mktemp(name)), dp, [*MODELS[model], *overrides], None))
            if world == 2:
                # one process -> cp2: two steps in one process, the third at cp 2 from its checkpoint.
                resumed = tmp_path_factory.mktemp("one-to-cp2")
                single_process(resumed, "trainer.stop_at=2")
                runs.append((str(resumed), 1, CP2, "auto"))
                # cp2 -> one process: two steps at cp 2 here, the third in one process afterwards.
                runs.append((str(tmp_path_factory.mktemp("cp2-to-one")), 1, [*CP2, "trainer.stop_at=2"], None))
                names += ["one process->cp2", "cp2->one process"]
            per_rank = run_distributed(several_worker, world, runs, timeout=600)
            for i, name in enumerate(names):
                cache[name] = merged([rank_results[i] for rank_results in per_rank], runs[i][0])
            if world == 2:
                cache["cp2->one process"] = single_process(runs[-1][0], resume="auto")
        return cache

    return get


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_context_parallel_trains_like_one_process(trained, single, layout):
    world, _, model, _ = LAYOUTS[layout]
    assert_same_training(trained(world)[layout], single(model))


@pytest.mark.parametrize("layout", list(BF16_LAYOUTS))
def test_context_parallel_in_bf16_within_twice_bf16s_own_error(trained, single, layout):
    world, _, model, _ = BF16_LAYOUTS[layout]
    multiple = 2
    reference, fp32 = single(model, *BF16), single(model)
    loss_tol, param_tol = bf16_tolerances(reference, fp32)
    losses, eval_losses, params, _ = trained(world)[layout]
    for step, loss in reference[0].items():
        assert abs(losses[step] - loss) <= multiple * loss_tol, (step, losses[step], loss, loss_tol)
    for step, loss in reference[1].items():
        assert abs(eval_losses[step] - loss) <= multiple * loss_tol, (step, eval_losses[step], loss, loss_tol)
    for name, ref in reference[2].items():
        error = rms(params[name] - ref)
        assert error <= multiple * param_tol[name], (name, error, param_tol[name])


@pytest.mark.parametrize("reshard", ["one process->cp2", "cp2->one process"])
def test_checkpoint_moves_between_context_degrees(trained, single, reshard):
    resumed = trained(2)[reshard]
    straight = single("recipe")
    assert resumed[0].keys() == {3}
    assert resumed[0][3] == pytest.approx(straight[0][3], rel=1e-5)
    for name, ref in straight[2].items():
        assert (resumed[2][name] - ref).abs().max() <= 1e-5 * (1 + ref.abs().max()), name
