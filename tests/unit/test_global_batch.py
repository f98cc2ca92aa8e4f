"""trainer.global_batch_size: the accumulation it implies at each data-parallel degree, the refusals
(by name, with values that work), and what a resume may change."""

from __future__ import annotations

import re

import numpy as np
import pytest

from sparsetron.launch.cli import main
from sparsetron.model.config import ConfigError
from sparsetron.train.config import TrainerConfig
from sparsetron.train.config_io import load_job_config, to_dict
from sparsetron.train.global_batch import resolve_global_batch
from sparsetron.train.resume import compare_with_checkpoint
from sparsetron.train.trainer import Trainer


def resolved(dp: int, **fields) -> TrainerConfig:
    tc = TrainerConfig(**fields)
    resolve_global_batch(tc, dp)
    return tc


def test_the_accumulation_follows_the_layout_and_zero_keeps_todays_batch():
    rng = np.random.default_rng()
    for _ in range(20):
        B, A, dp = (int(x) for x in rng.integers(1, 9, size=3))
        tc = resolved(dp, micro_batch_size=B, global_batch_size=B * A * dp)
        assert (tc.grad_accum_steps, tc.global_batch_size) == (A, B * A * dp)
        assert resolved(dp, micro_batch_size=B, global_batch_size=B * A * dp, grad_accum_steps=A).grad_accum_steps == A
        today = resolved(dp, micro_batch_size=B, grad_accum_steps=A)
        assert (today.grad_accum_steps, today.global_batch_size) == (A, B * A * dp)


def test_a_global_batch_that_does_not_split_names_the_keys_and_values_that_work():
    with pytest.raises(ConfigError) as err:
        resolved(2, micro_batch_size=4, global_batch_size=10)
    assert str(err.value) == (
        "trainer.global_batch_size: 10 sequences do not split into micro-batches of trainer.micro_batch_size=4 "
        "on data-parallel degree 2 (it must be a multiple of 4 x 2 = 8); nearest that work: "
        "trainer.global_batch_size=8 or 16, or trainer.micro_batch_size=1 or 5"
    )
    with pytest.raises(ConfigError, match=r"no trainer.micro_batch_size splits 9: it is not a multiple of the data"):
        resolved(2, micro_batch_size=2, global_batch_size=9)
    # Every value suggested does work, at random sizes.
    rng = np.random.default_rng()
    for _ in range(30):
        B, dp, G = int(rng.integers(1, 9)), int(rng.integers(1, 5)), int(rng.integers(1, 100))
        if G % (B * dp) == 0:
            continue
        with pytest.raises(ConfigError) as err:
            resolved(dp, micro_batch_size=B, global_batch_size=G)
        sizes, micro = _suggested(str(err.value))
        for G2 in sizes:
            assert resolved(dp, micro_batch_size=B, global_batch_size=G2).global_batch_size == G2
        for B2 in micro:
            assert resolved(dp, micro_batch_size=B2, global_batch_size=G).global_batch_size == G
        assert sizes and (micro or G % dp)


def _suggested(message: str) -> tuple[list[int], list[int]]:
    """The global batch sizes and micro-batch sizes an error suggests."""
    tail = message.split("nearest that work: ")[1]
    sizes = re.match(r"trainer\.global_batch_size=(\d+(?: or \d+)?)", tail).group(1)
    micro = re.search(r"trainer\.micro_batch_size=(\d+(?: or \d+)?)", tail)
    return [int(g) for g in sizes.split(" or ")], [int(b) for b in micro.group(1).split(" or ")] if micro else []


def test_grad_accum_steps_that_contradicts_the_global_batch_is_refused():
    with pytest.raises(ConfigError) as err:
        resolved(2, micro_batch_size=2, global_batch_size=16, grad_accum_steps=2)
    assert str(err.value) == (
        "trainer.grad_accum_steps: 2 contradicts trainer.global_batch_size=16, which takes 4 = 16 / "
        "(micro_batch_size 2 x data-parallel degree 2) on this layout; leave grad_accum_steps at 1 to have "
        "it derived, or set global_batch_size to 0"
    )


def test_the_command_line_refuses_it_before_anything_is_written(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["train", "debug-dense", "--set", f"trainer.run_dir={run_dir}", "--set", "trainer.global_batch_size=6"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: trainer.global_batch_size: 6 sequences do not split") and err.count("\n") == 1
    assert "trainer.global_batch_size=4 or 8, or trainer.micro_batch_size=3 or 6" in err
    assert not run_dir.exists()


def test_a_pipeline_names_the_global_batch_that_gave_too_few_micro_batches(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    job = load_job_config(
        "debug-dense",
        [
            f"trainer.run_dir={tmp_path}",
            "parallel.pipeline=2",
            "model.tie_embeddings=false",
            "trainer.global_batch_size=4",
        ],
    )
    with pytest.raises(ConfigError) as err:
        Trainer(job)
    assert str(err.value) == (
        "trainer.grad_accum_steps (= trainer.global_batch_size 4 / (micro_batch_size 4 x data-parallel degree 1)): "
        "the 1f1b schedule needs at least parallel.pipeline=2 micro-batches per step, got 1"
    )


def saved_at(dp: int, *overrides) -> dict:
    """A checkpoint's saved config, written at `dp` data-parallel ranks (resolved, as the Trainer saves it)."""
    job = load_job_config("debug-dense", ["trainer.grad_accum_steps=2", *overrides])
    resolve_global_batch(job.trainer, dp)
    return to_dict(job)


def resumed_at(dp: int, saved: dict, path, *overrides) -> list[str]:
    job = load_job_config("debug-dense", list(overrides))
    from_layout = job.trainer.global_batch_size == 0
    resolve_global_batch(job.trainer, dp)
    return compare_with_checkpoint(job, saved, path, from_layout)


def test_resuming_on_another_layout_keeps_the_batch_or_changes_it_only_when_told(tmp_path):
    saved = saved_at(2)  # 4 x 2 x dp 2 = 16 sequences
    with pytest.raises(ConfigError) as err:
        resumed_at(1, saved, tmp_path, "trainer.grad_accum_steps=2")  # the layout alone would halve it
    assert str(err.value) == (
        f"trainer.global_batch_size: checkpoint {tmp_path} trained 16 sequences per step, and this layout would "
        "train 8 (micro_batch_size 4 x grad_accum_steps 2 x data-parallel degree 1); set "
        "trainer.global_batch_size=16 to keep the batch, or trainer.global_batch_size=8 to change it"
    )
    kept = resumed_at(1, saved, tmp_path, "trainer.global_batch_size=16")
    assert kept == ["trainer.grad_accum_steps: 2 -> 4"]
    changed = resumed_at(1, saved, tmp_path, "trainer.global_batch_size=8")
    assert changed == ["trainer.global_batch_size: 16 -> 8"]
    # The same layout and settings resume without a word; a checkpoint from before the key was
    # saved (0) can be checked against nothing.
    assert resumed_at(2, saved, tmp_path, "trainer.grad_accum_steps=2") == []
    old = saved_at(2)
    old["trainer"]["global_batch_size"] = 0
    assert resumed_at(1, old, tmp_path, "trainer.grad_accum_steps=2") == []
