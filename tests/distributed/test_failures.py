"""A two-process job that loses a rank, run through the real command line under torchrun.

Killed: torchrun (`SPARSETRON_MAX_RESTARTS`) restarts the group, which resumes from the last
complete checkpoint; ten kills in a row (either rank, some during a save) and the run still
finishes with every step's loss bitwise equal to an uninterrupted run's. Hung: a rank that
sleeps outside any collective makes the job fail within `parallel.step_timeout_s`, with an
error naming that rank and the collective the others waited in.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import TORCHRUN_SH, UNINTERRUPTED, UNINTERRUPTED_STEPS, training_losses

from sparsetron.train.checkpoint import list_complete, step_of

SLEEPING_RANK = Path(__file__).resolve().parent / "sleeping_rank.py"
KILLS = 10
STEP_TIMEOUT_S = 4.0
# THP_MEM_ALLOC_ENABLE set: the CLI does not restart itself in every new worker.
ENV = {"THP_MEM_ALLOC_ENABLE": "1"}


def _train_args(run_dir: Path, *extra: str) -> list[str]:
    """The uninterrupted run's command line, saving at every step (so kills land in saves too)."""
    settings = [
        "checkpoint.interval=1",
        "checkpoint.keep_last=2",
        "metrics.console=plain",
        f"trainer.run_dir={run_dir}",
        *extra,
    ]
    return [*UNINTERRUPTED, *(arg for s in settings for arg in ("--set", s)), "--resume", "auto"]


class Launch:
    """A command in its own process group whose output lines are read as they come, with their times."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None):
        self.lines: list[tuple[float, str]] = []
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append((time.time(), line.rstrip("\n")))

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 120, after: float = 0.0) -> float:
        """The time of the `count`-th output line from time `after` on matching `pattern` (a regex), once there is one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [t for t, line in list(self.lines) if t >= after and re.search(pattern, line)]
            if len(found) >= count:
                return found[count - 1]
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"no {count}x {pattern!r} within {timeout} s; output:\n{self.text()[-4000:]}")

    def workers(self) -> dict[int, int]:
        """torchrun's worker processes by rank (its children, read from /proc)."""
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        found = {}
        for child in children:
            try:
                environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            ranks = [e[5:] for e in environ if e.startswith(b"RANK=")]
            if ranks:
                found[int(ranks[0])] = int(child)
        return found

    def finish(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._reader.join(timeout=5)

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def _newest_checkpoint(run_dir: Path) -> int:
    complete = [step_of(p) for p in list_complete(run_dir / "checkpoints")]
    return max(complete, default=0)


def _wait_until(condition, timeout: float = 60, poll: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {condition}"
        time.sleep(poll)


def _saving(run_dir: Path) -> bool:
    folder = run_dir / "checkpoints"
    return folder.is_dir() and any(p.name.startswith(".tmp_step_") for p in folder.iterdir())


def test_ten_killed_ranks_in_a_row_restart_resume_and_match_an_uninterrupted_run(tmp_path, uninterrupted_losses):
    killed_dir = tmp_path / "killed"
    run = Launch(
        ["bash", str(TORCHRUN_SH), "2", *_train_args(killed_dir)],
        env={**ENV, "SPARSETRON_MAX_RESTARTS": str(KILLS), "SPARSETRON_SHUTDOWN_TIMEOUT": "10"},
    )
    recoveries, during_save = [], 0
    try:
        run.wait_for(r"^step +1/")
        for kill in range(KILLS):
            victim = kill % 2
            # Each generation first completes a checkpoint of its own (else it would start over
            # from the same one), then is killed between steps, or inside its next save.
            newest = _newest_checkpoint(killed_dir)
            _wait_until(lambda newest=newest: _newest_checkpoint(killed_dir) > newest)
            if kill % 3 == 1:
                _wait_until(lambda: _saving(killed_dir), poll=0.002)
            saving = _saving(killed_dir)
            os.kill(run.workers()[victim], signal.SIGKILL)
            killed_at = time.time()
            during_save += saving
            # Each generation of workers prints the layout once, then where it starts from.
            resumed = run.wait_for(r"^layout: ", count=kill + 2)
            first_step = run.wait_for(r"^step +\d+/", after=resumed)
            recoveries.append(first_step - killed_at)
            print(
                f"kill {kill}: rank {victim}, during a save: {saving}, recovered in {recoveries[-1]:.1f} s",
                file=sys.stderr,
            )
        assert run.finish(timeout=300) == 0, run.text()[-4000:]
    finally:
        run.kill()

    output = run.text()
    assert output.count(f"done: step {UNINTERRUPTED_STEPS}") == 1
    # A kill before the first checkpoint was complete starts the next generation at step 0.
    starts = re.findall(
        r"^(?:resumed from .* at step (\d+)|no complete checkpoint in .*; starting from step 0)$", output, re.M
    )
    resumed_at = [int(step or 0) for step in starts]
    assert len(resumed_at) == KILLS + 1 and resumed_at == sorted(resumed_at), resumed_at
    assert resumed_at[-1] > 0
    assert during_save >= 1, "no kill landed inside a save"
    losses = training_losses(killed_dir)
    assert sorted(losses) == sorted(uninterrupted_losses)
    for step, values in losses.items():
        # Steps trained again after a restart too: bitwise what the uninterrupted run computed.
        assert values == [uninterrupted_losses[step]] * len(values), (step, values, uninterrupted_losses[step])
    print(
        f"\n{KILLS} kills ({during_save} during a save): kill -> first resumed step "
        f"{min(recoveries):.1f}-{max(recoveries):.1f} s (mean {sum(recoveries) / len(recoveries):.1f} s)",
        file=sys.stderr,
    )


def test_a_rank_that_hangs_fails_the_job_within_the_timeout_naming_it(tmp_path):
    sleeper, step = 1, 2
    run = Launch(
        ["torchrun", "--standalone", "--nproc-per-node", "2", str(SLEEPING_RANK), str(sleeper), str(step), "600"]
        + ["train", *_train_args(tmp_path, f"parallel.step_timeout_s={STEP_TIMEOUT_S}")],
        env={**ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"},
    )
    try:
        failed = run.wait_for(r"^error: rank 0 ", timeout=180)
    finally:
        run.kill()
    detected = failed - float((tmp_path / "asleep").read_text())
    error = next(line for _, line in run.lines if line.startswith("error: rank 0 "))
    # rank 0 names the collective it waited in, and the sleeping rank with what it was doing.
    assert re.search(r"collective gloo:\w+ #\d+ of process group \d+ \(ranks 0, 1\)", error), error
    assert f"rank(s) {sleeper} did not reach it: rank {sleeper} is in 'after step {step}' for" in error, error
    assert STEP_TIMEOUT_S <= detected <= STEP_TIMEOUT_S + 5, detected
    print(f"\nhang detected {detected:.1f} s after the rank fell asleep (timeout {STEP_TIMEOUT_S} s)", file=sys.stderr)
