"""`sparsetron plan`: the layout, counts and memory plan of a run, without running it; its memory
plan is the one `train` prints. tests/distributed/test_plan.py compares several-rank layouts."""

import random

import pytest
import torch

from sparsetron.launch.cli import main
from sparsetron.model.params import num_params
from sparsetron.model.transformer import materialised_transformer
from sparsetron.train.config_io import load_job_config
from sparsetron.train.plan import plan_job
from sparsetron.train.trainer import Trainer


def random_dense(tmp_path):
    """debug-dense with a fresh random shape, in bf16 (a precision the plan must take from the config)."""
    rng = random.Random()
    return [
        f"model.n_layers={rng.randint(1, 3)}",
        f"model.ffn_hidden={rng.choice([96, 160, 224])}",
        f"model.tie_embeddings={rng.choice(['true', 'false'])}",
        f"trainer.micro_batch_size={rng.randint(1, 4)}",
        f"trainer.grad_accum_steps={rng.randint(1, 3)}",
        "trainer.precision=bf16",
        "data.max_documents=60",
        f"trainer.run_dir={tmp_path}",
    ]


def test_plan_counts_and_memory_plan_match_what_train_builds(tmp_path, capsys):
    overrides = random_dense(tmp_path)
    plan = plan_job(load_job_config("debug-dense", overrides), 1)
    trainer = Trainer(load_job_config("debug-dense", overrides))
    try:
        assert plan.memory == {0: trainer.memory_plan}
        assert plan.total_params == num_params(trainer.model)
        # Dense: every weight but the input embedding is active for every token.
        assert plan.active_params == num_params(trainer.model, exclude_embeddings=True)
        assert plan.total_params - plan.embedding_params == plan.active_params
        tc = trainer.job.trainer
        assert plan.tokens_per_step == trainer.tokens_per_step
        assert plan.sequences_per_step == tc.micro_batch_size * tc.grad_accum_steps
        assert plan.flops_per_token == trainer.flops_per_token
    finally:
        trainer.close()
    assert not (tmp_path / "checkpoints").exists()

    assert main(["plan", "debug-dense", *[a for o in overrides for a in ("--set", o)]]) == 0
    out = capsys.readouterr().out
    described = trainer.memory_plan.describe().removeprefix("memory per rank: ")
    assert f"rank 0: {described}" in out
    assert f"{plan.tokens_per_step:,} tokens per step" in out


def test_moe_plan_counts_routed_experts_as_held_not_active(tmp_path):
    job = load_job_config("tiny", ["data.max_documents=60", f"trainer.run_dir={tmp_path}", "model.vocab_size=320"])
    plan = plan_job(job, 1)
    model = materialised_transformer(job.model, job.attention, job.moe, device="meta")
    assert plan.total_params == num_params(model)
    assert plan.active_params < num_params(model, exclude_embeddings=True)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nproc", "3"], "WORLD_SIZE is 3"),
        (["--nproc", "0"], "--nproc must be at least 1, got 0"),
        (["--nproc", "2", "--set", "parallel.tensor=2", "--set", "data.seq_len=63"], "data.seq_len=63"),
        (["--nproc", "3", "--set", "parallel.tensor=3"], "parallel.tensor=3 must divide attention.n_heads=4"),
        (["--set", "data.source=text", "--set", "data.paths=[/nonexistent/x.txt]"], "/nonexistent/x.txt"),
    ],
)
def test_bad_layouts_and_data_are_one_error_line(args, message, capsys):
    assert main(["plan", "debug-dense", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not torch.distributed.is_initialized()


def test_train_dry_run_prints_the_plan_and_trains_nothing(tmp_path, capsys):
    assert main(["train", "debug-dense", "--dry-run", "--set", f"trainer.run_dir={tmp_path}"]) == 0
    assert "memory       rank 0:" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())
