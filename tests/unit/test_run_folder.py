"""The run folder: a run_dir or checkpoint.folder that cannot be written is refused by name before
anything is built, and a run folder is held by one run at a time (a stale lock is taken over)."""

import json
import os
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from sparsetron.launch.cli import main
from sparsetron.train.run_folder import LOCK_FILE, RunFolderError, RunLock

# No data is read and no model is built before these checks, so any recipe runs them at once.
RECIPE = ["train", "debug-dense", "--set", "metrics.console=none"]


def train(run_dir, *settings: str) -> int:
    args = [*RECIPE, "--set", f"trainer.run_dir={run_dir}"]
    for setting in settings:
        args += ["--set", setting]
    return main(args)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("error: "), err
    return err.strip()


@pytest.mark.parametrize("where", ["run_dir", "under_run_dir"])
def test_a_run_dir_that_is_a_file_or_lies_under_one_is_refused_by_name(tmp_path, capsys, where):
    file = tmp_path / f"notes_{os.urandom(3).hex()}.txt"
    content = os.urandom(64).hex()
    file.write_text(content)
    run_dir = file if where == "run_dir" else file / "run"
    assert train(run_dir) == 2
    line = one_error_line(capsys)
    if where == "run_dir":
        assert line == f"error: trainer.run_dir: {file} is a file, not a folder"
    else:
        assert line == f"error: trainer.run_dir: {run_dir} cannot be created: {file} is a file, not a folder"
    assert file.read_text() == content
    assert sorted(tmp_path.iterdir()) == [file]


def test_a_checkpoint_folder_where_no_file_can_be_created_is_refused_by_name(tmp_path, capsys):
    # sysfs refuses new files even to root (and is read-only in containers): the probe really fails.
    unwritable = Path("/sys")
    try:
        tempfile.mkstemp(dir=unwritable)
        pytest.skip("files can be created in /sys here")
    except OSError as err:
        reason = err.strerror
    folder = unwritable / f"sparsetron_{os.urandom(3).hex()}"
    assert train(tmp_path / "run", f"checkpoint.folder={folder}") == 2
    assert one_error_line(capsys) == (
        f"error: checkpoint.folder: {folder} cannot be created: cannot create a file in {unwritable} ({reason})"
    )
    assert not (tmp_path / "run").exists()  # checked before the run folder was made


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()  # reaped: its PID names no process (until the kernel reuses it)
    return child.pid


def write_lock(run_dir: Path, **holder) -> dict:
    record = {
        "host": socket.gethostname(),
        "pid": dead_pid(),
        "started": "2026-01-02T03:04:05Z",
        "slurm_job": None,
        "torchrun_run": None,
        **holder,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_FILE).write_text(json.dumps(record))
    return record


def test_a_second_run_in_the_same_folder_is_refused_naming_the_holder(tmp_path, capsys):
    run_dir = tmp_path / "run"
    first_files = {"config.yaml": os.urandom(32).hex(), "metrics.jsonl": os.urandom(32).hex()}
    run_dir.mkdir()
    for name, text in first_files.items():
        (run_dir / name).write_text(text)
    # The first run: another process, holding the lock until told to go.
    go, hold = os.pipe()
    ready, told = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            with RunLock(run_dir):
                os.write(told, b"x")
                os.read(go, 1)
        finally:
            os._exit(0)
    try:
        assert os.read(ready, 1) == b"x"
        holder = json.loads((run_dir / LOCK_FILE).read_text())
        assert train(run_dir) == 2
        line = one_error_line(capsys)
        assert line == (
            f"error: trainer.run_dir {run_dir} is in use by another run: host {socket.gethostname()}, PID {pid}, "
            f"started {holder['started']}; stop it, or use another trainer.run_dir "
            f"(if that process is gone, delete {run_dir / LOCK_FILE})"
        )
        assert {p.name: p.read_text() for p in run_dir.iterdir() if p.name != LOCK_FILE} == first_files
        assert json.loads((run_dir / LOCK_FILE).read_text()) == holder
    finally:
        os.write(hold, b"x")
        os.waitpid(pid, 0)
    assert not (run_dir / LOCK_FILE).exists()  # the first run let go


def test_a_lock_whose_process_is_gone_is_taken_over_and_released(tmp_path):
    run_dir = tmp_path / "run"
    stale = write_lock(run_dir, slurm_job=os.urandom(2).hex())
    with RunLock(run_dir) as lock:
        assert lock.notice == (
            f"took over the stale lock {run_dir / LOCK_FILE} of host {stale['host']}, PID {stale['pid']}, "
            f"started {stale['started']} (SLURM job {stale['slurm_job']}), whose process is gone"
        )
        mine = json.loads((run_dir / LOCK_FILE).read_text())
        assert (mine["host"], mine["pid"]) == (socket.gethostname(), os.getpid())
        with pytest.raises(RunFolderError, match=rf"held by this very process .*PID {os.getpid()}"):
            RunLock(run_dir).__enter__()
    assert sorted(run_dir.iterdir()) == []


@pytest.mark.parametrize("variable, key", [("SLURM_JOB_ID", "slurm_job"), ("TORCHELASTIC_RUN_ID", "torchrun_run")])
def test_another_hosts_lock_is_taken_over_only_by_the_same_job(tmp_path, monkeypatch, variable, key):
    run_dir = tmp_path / "run"
    job = os.urandom(4).hex()
    monkeypatch.setenv(variable, job)
    # Alive or not, a process of another host cannot be checked from here: only its job's identity counts.
    other = write_lock(run_dir, host=f"{socket.gethostname()}-other", pid=os.getpid(), **{key: f"{job}0"})
    with pytest.raises(RunFolderError, match=rf"in use by another run: host {other['host']}, PID {other['pid']}"):
        RunLock(run_dir).__enter__()
    assert json.loads((run_dir / LOCK_FILE).read_text()) == other

    write_lock(run_dir, host=other["host"], pid=os.getpid(), **{key: job})
    with RunLock(run_dir) as lock:
        assert lock.notice.endswith("(requeued)" if key == "slurm_job" else "(restarted)")
        assert job in lock.notice
        assert json.loads((run_dir / LOCK_FILE).read_text())[key] == job


def test_a_run_that_fails_after_taking_the_lock_lets_go_and_leaves_no_folder(tmp_path, capsys):
    run_dir = tmp_path / "new" / "run"
    missing = tmp_path / "absent.jsonl"
    assert train(run_dir, "data.source=jsonl", f"data.paths=[{missing}]") == 2
    assert "absent.jsonl" in one_error_line(capsys)
    assert sorted(tmp_path.iterdir()) == []  # the folders it made for its lock are gone again
