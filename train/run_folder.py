"""The run folder: checked for writing before anything is built, and held by one run at a time.

`check_writable` tries what a run will do: create a file in the folder (or, where the folder
does not exist yet, in the nearest existing folder above it, where it will be made). Trying
is the only honest test: permission bits say nothing to root, nor about read-only mounts.

`RunLock` is `<run_dir>/run.lock`, taken by rank 0 before anything in the folder is touched
and removed when the run ends (also on an error). It holds the holder's host, PID, start
time and scheduler job (SLURM_JOB_ID, TORCHELASTIC_RUN_ID), and an exclusive `flock` on it
keeps two starting runs of one host apart. A lock left behind by a killed run is stale and
taken over, with a message, when its holder can be known to be gone:

- on this host, when the recorded PID no longer runs (a live PID is never taken over, even
  where the flock is free: a filesystem may not implement flock, and a PID may be reused);
- on another host, only for the same scheduler job: the same SLURM job (requeued, possibly on
  another node) or the same torchrun run id (a restart after a rank was killed; torchrun stops
  a generation's workers before it starts the next). Anything else from another host is
  refused, since no process of another host can be checked from here.

A refused run names the holder and the lock file to delete once that process is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sparsetron.model.config import ConfigError
from sparsetron.train.processes import pid_alive

LOCK_FILE = "run.lock"
# torchrun's TORCHELASTIC_RUN_ID when no --rdzv-id was given: the same for unrelated launches.
UNNAMED_TORCHRUN_RUN = "none"


class RunFolderError(ConfigError):
    """trainer.run_dir or checkpoint.folder cannot be written, or another run holds the run folder."""


def nearest_existing(path: Path) -> Path:
    """`path` itself if anything exists there, else its nearest ancestor that does."""
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_writable(folder: str | Path, key: str) -> None:
    """Raise RunFolderError naming `key` unless a file can be created in `folder` (or it can be made).

    Creates and removes one empty temporary file; creates no folder.
    """
    path = Path(folder)
    existing = nearest_existing(path)
    if not existing.is_dir():
        if existing == path:
            raise RunFolderError(f"{key}: {path} is a file, not a folder")
        raise RunFolderError(f"{key}: {path} cannot be created: {existing} is a file, not a folder")
    try:
        handle, probe = tempfile.mkstemp(prefix=".sparsetron_write_test_", dir=existing)
    except OSError as err:
        what = f"{path} is not writable" if existing == path else f"{path} cannot be created"
        raise RunFolderError(f"{key}: {what}: cannot create a file in {existing} ({err.strerror})") from err
    os.close(handle)
    os.unlink(probe)


@dataclass
class LockHolder:
    """Who holds a run folder, as its lock file records it."""

    host: str
    pid: int
    started: str
    """UTC, ISO 8601."""
    slurm_job: str | None = None
    torchrun_run: str | None = None

    @classmethod
    def this_process(cls) -> LockHolder:
        run = os.environ.get("TORCHELASTIC_RUN_ID")
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            slurm_job=os.environ.get("SLURM_JOB_ID"),
            torchrun_run=None if run == UNNAMED_TORCHRUN_RUN else run,
        )

    @classmethod
    def parse(cls, text: str) -> LockHolder | None:
        """The holder a lock file's text records, or None where it records none (empty, torn, foreign)."""
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError):
            return None

    def describe(self) -> str:
        jobs = [f"SLURM job {self.slurm_job}"] if self.slurm_job else []
        jobs += [f"torchrun run {self.torchrun_run}"] if self.torchrun_run else []
        return f"host {self.host}, PID {self.pid}, started {self.started}" + (f" ({', '.join(jobs)})" if jobs else "")


def stale_reason(holder: LockHolder, me: LockHolder) -> str | None:
    """Why `holder`'s lock may be taken over by `me` (see the module docstring), or None when it may not."""
    if holder.host == me.host:
        return None if pid_alive(holder.pid) else "whose process is gone"
    if holder.slurm_job and holder.slurm_job == me.slurm_job:
        return f"of this same SLURM job {me.slurm_job} (requeued)"
    if holder.torchrun_run and holder.torchrun_run == me.torchrun_run:
        return f"of this same torchrun run {me.torchrun_run} (restarted)"
    return None


class RunLock:
    """`with RunLock(run_dir) as lock:` holds the run folder (creating it) until the block ends.

    `lock.notice` says whose stale lock was taken over, if any. Raises RunFolderError naming
    the holder when another run holds the folder.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.notice: str | None = None
        self._fd: int | None = None
        self._created: list[Path] = []

    def __enter__(self) -> RunLock:
        missing = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunFolderError(f"trainer.run_dir: cannot create {self.run_dir}: {err.strerror}") from err
        self._created = missing  # innermost first: removed again, if still empty, when the run ends
        try:
            self._acquire()
        except BaseException:
            self._remove_created()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _acquire(self) -> None:
        me = LockHolder.this_process()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = False
            except BlockingIOError:
                held = True
            if not held and not _same_file(fd, self.path):
                os.close(fd)  # its holder removed it while we opened it: try the new one
                continue
            holder = LockHolder.parse(os.pread(fd, 1 << 16, 0).decode(errors="replace"))
            if holder is None and not held:
                break  # a fresh lock, or a torn one nobody holds
            reason = None if holder is None else stale_reason(holder, me)
            if reason is None:
                os.close(fd)
                raise RunFolderError(self._refusal(holder, me))
            self.notice = f"took over the stale lock {self.path} of {holder.describe()}, {reason}"
            if not held:
                break
            # The flock outlived its holder (a child process keeps the file open, or another
            # host's lock lingers): a new file, which nobody else holds, replaces it.
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self._fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(asdict(me)) + "\n").encode(), 0)
        os.fsync(fd)

    def _refusal(self, holder: LockHolder | None, me: LockHolder) -> str:
        if holder is None:
            return (
                f"trainer.run_dir {self.run_dir} is held by another run that is just starting "
                f"(its lock {self.path} names no holder yet); start this run in another trainer.run_dir"
            )
        if (holder.host, holder.pid) == (me.host, me.pid):
            return (
                f"trainer.run_dir {self.run_dir} is held by this very process (another Trainer, {holder.describe()}); "
                "close() it before starting another in the same folder"
            )
        return (
            f"trainer.run_dir {self.run_dir} is in use by another run: {holder.describe()}; "
            f"stop it, or use another trainer.run_dir (if that process is gone, delete {self.path})"
        )

    def release(self) -> None:
        """Remove the lock file (while still holding it, so no waiter takes the old file) and let go."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if _same_file(fd, self.path):
                os.unlink(self.path)
        finally:
            os.close(fd)
        self._remove_created()

    def _remove_created(self) -> None:
        # Folders this run created and left empty (a run refused by a later check) go again.
        for folder in self._created:
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []


def _same_file(fd: int, path: Path) -> bool:
    """Whether `fd` is still the file at `path` (not one removed and replaced meanwhile)."""
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)
