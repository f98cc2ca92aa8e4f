"""`launch/torchrun.sh` runs the real command line on two processes: one console, one set of outputs;
its launcher (sparsetron.launch.torchrun) ends a failed job with one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsetron.model.transformer import active_params
from sparsetron.train.config_io import load_job_config
from sparsetron.train.flops import flops_per_token

SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "torchrun.sh"
FAILING_RANK = Path(__file__).resolve().parent / "failing_rank.py"


def test_two_process_fsdp_run_from_the_command_line(tmp_path):
    run = subprocess.run(
        [
            "bash",
            str(SCRIPT),
            "2",
            "debug-deepseek",
            "--set",
            "parallel.data_parallel_shard=2",
            "--set",
            "trainer.steps=4",
            "--set",
            "metrics.log_interval=2",
            "--set",
            "checkpoint.interval=2",
            "--set",
            "metrics.peak_tflops=1.0",
            "--set",
            f"trainer.run_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("done: step 4") == 1  # rank 0 alone reports
    assert sum(1 for line in run.stdout.splitlines() if line.startswith("step 2/4 |")) == 1
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    training = [r for r in records if "loss" in r]
    assert [r["step"] for r in training] == [2, 4]
    # Per step: two ranks of 4 sequences of 64 tokens, one micro-batch each.
    assert training[-1]["tokens_seen"] == 4 * 2 * 4 * 64
    # MFU is per accelerator: each of the 2 ranks did half of the tokens/s reported.
    job = load_job_config("debug-deepseek", ["model.vocab_size=320"])
    per_token = flops_per_token(active_params(job.model, job.attention, job.moe), 3, 4, 16, 64)
    last = training[-1]
    assert last["mfu"] == pytest.approx(last["tokens_per_s"] / 2 * per_token / 1e12, rel=1e-6)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "step_00000004").glob("train_state_rank*.pt")) == [
        "train_state_rank0.pt",
        "train_state_rank1.pt",
    ]


def test_a_bad_input_on_one_rank_is_one_line_naming_it(tmp_path):
    # Rank 1 alone is given a checkpoint that does not exist (tests/distributed/failing_rank.py);
    # rank 0 is stopped by torchrun, or fails in a collective when rank 1 is gone.
    missing = tmp_path / "no-such-checkpoint"
    run = subprocess.run(
        [sys.executable, "-m", "sparsetron.launch.torchrun", "--standalone", "--nproc-per-node", "2"]
        + [str(FAILING_RANK), "1", str(missing), "train", "debug-dense", "--set", "parallel.data_parallel_shard=2"]
        + ["--set", f"trainer.run_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"},
    )
    assert run.returncode == 2, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: rank 1: checkpoint {missing} does not exist"], run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    assert "terminate called" not in run.stderr and "SIGABRT" not in run.stderr
