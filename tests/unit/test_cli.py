"""The `sparsetron` command line, run as a user would."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sparsetron.launch.cli import main

FAST = [
    "--set",
    "trainer.steps=6",
    "--set",
    "schedule.warmup_steps=1",
    "--set",
    "checkpoint.interval=3",
    "--set",
    "metrics.log_interval=2",
]


def cli(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "sparsetron.launch.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


def test_help_lists_commands_and_options():
    out = cli("--help").stdout
    for command in ("train", "config", "recipes"):
        assert command in out
    train_help = cli("train", "--help").stdout
    assert "--resume" in train_help and "--set" in train_help and "tiny" in train_help


def test_recipes_and_config(capsys):
    assert main(["recipes"]) == 0
    assert "tiny" in capsys.readouterr().out.split()
    assert main(["config", "tiny", "--set", "moe.top_k=2"]) == 0
    assert "top_k: 2" in capsys.readouterr().out
    assert (
        main(
            [
                "config",
                "tiny",
                "--set",
                "trainer.run_dir=/x",
                "--get",
                "trainer.run_dir",
                "--get",
                "moe.top_k",
                "--set",
                "moe.top_k=3",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.split() == ["/x", "3"]
    assert main(["config", "tiny", "--get", "trainer.nope"]) == 2
    assert "unknown key trainer.nope" in capsys.readouterr().err
    assert main(["config", "--doc"]) == 0
    assert "moe.capacity_factor" in capsys.readouterr().out


def test_bad_key_is_one_clear_error(tmp_path):
    run = cli("train", "tiny", "--set", "moe.topk=2", "--set", f"trainer.run_dir={tmp_path}")
    assert run.returncode == 2
    assert run.stderr.strip().startswith("error: unknown key moe.topk")
    assert "Traceback" not in run.stderr
    assert not any(tmp_path.iterdir())  # nothing was written


def test_train_prints_progress_and_writes_outputs(tmp_path):
    run = cli("train", "debug-deepseek", *FAST, "--set", f"trainer.run_dir={tmp_path}")
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stdout.splitlines() if line.lstrip().startswith("step")]
    assert any("loss" in line and "tok/s" in line for line in lines), run.stdout
    assert "done: step 6" in run.stdout
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"] for r in records if "loss" in r}
    assert logged == {2, 4, 6}
    assert any(key.startswith("moe/") for key in records[-1]) or any(
        key.startswith("moe/") for r in records for key in r
    )
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
# SIGTERM here, in a process of its own; Ctrl-C (SIGINT) in tests/unit/test_trainer.py, SIGUSR1 in
# tests/distributed/test_slurm.py: the one handler takes all three.
@pytest.mark.parametrize("sig", [signal.SIGTERM], ids=["SIGTERM"])
def test_a_signal_saves_and_resume_continues(tmp_path, sig):
    args = [
        sys.executable,
        "-m",
        "sparsetron.launch.cli",
        "train",
        "debug-dense",
        "--set",
        "trainer.steps=100000",
        "--set",
        "metrics.log_interval=1",
        "--set",
        "checkpoint.interval=0",
        "--set",
        f"trainer.run_dir={tmp_path}",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        if line.lstrip().startswith("step") and "tok/s" in line:  # a training step, not the step-0 eval
            break
        assert time.monotonic() < deadline
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err  # saved, and stopped by the signal (launch/cli.py's table)
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert len(saved) == 1
    step = int(saved[0].split("_")[1])
    assert step >= 1 and "resume with --resume auto" in out
    resumed = cli(
        "train",
        "debug-dense",
        "--set",
        "trainer.steps=100000",
        "--set",
        f"trainer.stop_at={step + 2}",
        "--set",
        f"trainer.run_dir={tmp_path}",
        "--resume",
        "auto",
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and f"done: step {step + 2}" in resumed.stdout


# Reports each start of the process, then runs the command line as `sparsetron` would.
RUN_CLI_REPORTING_STARTS = (
    "import os, sys; print('process start', os.environ.get('THP_MEM_ALLOC_ENABLE'), flush=True); "
    "from sparsetron.launch.cli import main; sys.exit(main())"
)


@pytest.mark.parametrize("preset", [None, "0"])
def test_cpu_training_restarts_once_with_huge_pages_unless_opted_out(tmp_path, preset):
    env = {key: value for key, value in os.environ.items() if key != "THP_MEM_ALLOC_ENABLE"}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    args = ["train", "debug-deepseek", "--set", "trainer.steps=1", "--set", "schedule.warmup_steps=1"]
    args += ["--set", "trainer.device=cpu", "--set", f"trainer.run_dir={tmp_path}"]
    run = subprocess.run(
        [sys.executable, "-c", RUN_CLI_REPORTING_STARTS, *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert "done: step 1" in run.stdout
    starts = [line for line in run.stdout.splitlines() if line.startswith("process start")]
    if preset is None:
        assert starts == ["process start None", "process start 1"]
        assert run.stderr.count("restarting with THP_MEM_ALLOC_ENABLE=1") == 1
    else:
        assert starts == ["process start 0"]
        assert "restarting" not in run.stderr
