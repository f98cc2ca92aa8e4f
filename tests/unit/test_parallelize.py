"""Activation checkpointing and compile change how a step runs, never what it computes; layouts that
cannot run are refused before any process group exists."""

import re

import pytest

from sparsetron.model.config import ConfigError
from sparsetron.parallel.dims import ParallelDims
from sparsetron.parallel.parallelize import check_supported
from sparsetron.train.config_io import load_job_config
from sparsetron.train.trainer import Trainer

STEPS = 4


def job(run_dir, *overrides):
    return load_job_config(
        "debug-deepseek",
        [
            f"trainer.steps={STEPS}",
            "trainer.grad_accum_steps=2",
            "schedule.warmup_steps=1",
            "checkpoint.interval=0",
            "metrics.console=none",
            f"trainer.run_dir={run_dir}",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    return Trainer(job(tmp_path_factory.mktemp("eager"))).run()


def test_activation_checkpointing_is_bitwise_equal(tmp_path, eager):
    ac = Trainer(job(tmp_path, "parallel.activation_checkpointing=full")).run()
    assert ac.losses == eager.losses
    assert ac.eval_losses == eager.eval_losses


def test_checkpoint_keys_do_not_depend_on_activation_checkpointing(tmp_path, eager):
    Trainer(job(tmp_path, "parallel.activation_checkpointing=full", "trainer.stop_at=2")).run()
    resumed = Trainer(job(tmp_path), resume="auto").run()
    assert resumed.losses == {s: v for s, v in eager.losses.items() if s > 2}


def test_compiled_blocks_match_eager(tmp_path, eager):
    compiled = Trainer(job(tmp_path, "parallel.compile=true")).run()
    assert compiled.losses.keys() == eager.losses.keys()
    for step, loss in eager.losses.items():
        assert compiled.losses[step] == pytest.approx(loss, rel=1e-4), step


REFUSED = {
    "uneven context split": (2, ["parallel.context=2", "data.seq_len=62"], "data.seq_len=62"),
    "context x tensor split": (8, ["parallel.context=2", "parallel.tensor=4", "data.seq_len=36"], "context x parallel"),
    "context over MoBA blocks": (
        2,
        ["parallel.context=2", "attention.backend=moba", "attention.moba_block_size=32", "data.seq_len=64"],
        "attention.moba_block_size 32",
    ),
    "ulysses heads": (3, ["parallel.context=3", "parallel.context_style=ulysses", "data.seq_len=60"], "n_heads=4"),
    "uneven sequence split": (2, ["parallel.tensor=2", "data.seq_len=63"], "data.seq_len=63"),
    "too few micro-batches": (2, ["parallel.pipeline=2", "trainer.grad_accum_steps=1"], "trainer.grad_accum_steps"),
    "tied pipeline": (2, ["parallel.pipeline=2", "model.tie_embeddings=true"], "model.tie_embeddings"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_layouts_that_cannot_run_are_refused_by_key_before_any_process_group(case):
    world, overrides, key = REFUSED[case]
    cfg = load_job_config("debug-deepseek", overrides)
    dims = ParallelDims.from_config(cfg.parallel, world)
    with pytest.raises(ConfigError, match=re.escape(key)):
        check_supported(cfg.parallel, dims, cfg.model, cfg.attention, cfg.data.seq_len, cfg.trainer.grad_accum_steps)
