"""Disk space for checkpoints in a training run: a run whose checkpoint cannot fit is refused at
start, a save that cannot fit is refused before it writes and the previous checkpoint resumes (in
a run folder whose stale lock it takes over, saying so). A write that runs out of space all the
same (a patched writer, and a real tmpfs) is tested on the CheckpointManager in test_checkpoint.py."""

import json
import os
import re
import socket
import subprocess

from sparsetron.launch.cli import main
from sparsetron.parallel.memory import format_bytes
from sparsetron.train.checkpoint import manager as ckpt
from sparsetron.train.run_folder import LOCK_FILE

MiB = 1 << 20
TRAIN = ["train", "debug-dense", "--set", "metrics.console=plain", "--set", "trainer.steps=2"]
TRAIN += ["--set", "checkpoint.interval=1", "--set", "trainer.eval_interval=0", "--set", "data.max_documents=120"]


def train(run_dir, *extra: str) -> int:
    return main([*TRAIN, "--set", f"trainer.run_dir={run_dir}", *extra])


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


def test_a_run_whose_checkpoint_cannot_fit_is_refused_at_start(tmp_path, monkeypatch, capsys):
    free = int.from_bytes(os.urandom(2), "little") * 16 + MiB  # 1-2 MiB: a checkpoint needs more
    monkeypatch.setattr(ckpt, "free_bytes", lambda folder: free)
    assert train(tmp_path / "run") == 2
    line = error_line(capsys)
    found = re.fullmatch(
        rf"error: checkpoint\.folder {tmp_path}/run/checkpoints has (.+) free, a checkpoint needs about ([\d.]+) MiB",
        line,
    )
    assert found and found.group(1) == format_bytes(free), line
    assert float(found.group(2)) * MiB > free
    assert not (tmp_path / "run").exists()  # nothing written, the lock's folder gone again


def test_a_save_that_cannot_fit_is_refused_before_writing_and_the_previous_checkpoint_resumes(
    tmp_path, monkeypatch, capsys
):
    run_dir, folder = tmp_path / "run", tmp_path / "run" / "checkpoints"
    first = folder / "step_00000001"
    free = int.from_bytes(os.urandom(2), "little") * 16 + MiB
    # The disk fills up once the first checkpoint is written.
    monkeypatch.setattr(ckpt, "free_bytes", lambda f: free if (first / ".complete").exists() else 1 << 50)
    assert train(run_dir) == 2
    line = error_line(capsys)
    found = re.fullmatch(
        rf"error: disk full at {folder}: ([\d.]+) MiB needed, (.+) free; step_00000002 was not saved; "
        r"the newest checkpoint, step_00000001, is intact \(free space, then --resume auto\)",
        line,
    )
    assert found and found.group(2) == format_bytes(free), line
    # The estimate covers a real checkpoint of this model.
    assert float(found.group(1)) * MiB >= sum(p.stat().st_size for p in first.iterdir())
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000001"]
    assert not (run_dir / LOCK_FILE).exists()

    monkeypatch.undo()
    # And the resumed run finds the lock of a run killed meanwhile (its PID gone): it takes it over and says so.
    killed = subprocess.Popen(["true"])
    killed.wait()
    holder = {"host": socket.gethostname(), "pid": killed.pid, "started": "2026-01-02T03:04:05Z"}
    (run_dir / LOCK_FILE).write_text(json.dumps(holder))
    assert train(run_dir, "--resume", "auto") == 0
    out = capsys.readouterr().out
    assert f"resumed from {first} at step 1" in out and "done: step 2" in out
    assert f"took over the stale lock {run_dir / LOCK_FILE} of host {holder['host']}, PID {killed.pid}" in out
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000001", "step_00000002"]
