"""Make `harness` importable from the distributed tests (pytest runs with --import-mode=importlib);
spawned workers inherit the parent's sys.path, so they find it too. And one uninterrupted
two-rank run of the command line that the launch tests (killed ranks, SLURM preemption)
compare their interrupted runs with.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


# ---- one uninterrupted two-rank run that the launch tests (killed ranks, SLURM preemption) compare with


TORCHRUN_SH = Path(__file__).resolve().parents[2] / "launch" / "torchrun.sh"
UNINTERRUPTED_STEPS = 40
# The run's setting that change its numbers; a test may add ones that do not (checkpoints, logging).
UNINTERRUPTED = [
    "debug-dense",
    *(
        arg
        for item in (
            "parallel.data_parallel_shard=2",
            f"trainer.steps={UNINTERRUPTED_STEPS}",
            "trainer.eval_interval=0",
            "metrics.log_interval=1",
            "metrics.tensorboard=false",
        )
        for arg in ("--set", item)
    ),
]


def training_losses(run_dir: Path) -> dict[int, list[float]]:
    """Every training loss metrics.jsonl holds, by step (a step trained again after a restart twice)."""
    losses: dict[int, list[float]] = {}
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):
                break  # a line still being written
            raise
        if "loss" in record:
            losses.setdefault(record["step"], []).append(record["loss"])
    return losses


@pytest.fixture(scope="session")
def uninterrupted_losses(tmp_path_factory) -> dict[int, float]:
    """Each step's loss of `launch/torchrun.sh 2 UNINTERRUPTED`, run once per session."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run = subprocess.run(
        ["bash", str(TORCHRUN_SH), "2", *UNINTERRUPTED, "--set", f"trainer.run_dir={run_dir}"],
        env={**os.environ, "THP_MEM_ALLOC_ENABLE": "1"},  # what the CLI would restart itself with
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    losses = training_losses(run_dir)
    assert sorted(losses) == list(range(1, UNINTERRUPTED_STEPS + 1))
    return {step: values[0] for step, values in losses.items()}
