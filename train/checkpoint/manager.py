"""CheckpointManager: saves, commits (also in the background), prunes, recovers and loads step folders.

Finding the folder to resume from is its base class's (resume.py); the package's
docstring (__init__.py) describes the folders and how they are committed.
"""

from __future__ import annotations

import datetime
import shutil
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

from sparsetron.train.checkpoint.checksums import digest_share, marker_entries
from sparsetron.train.checkpoint.disk_space import (
    NO_SPACE,
    DiskFullError,
    disk_full,
    disk_full_cause,
    free_bytes,
    too_small_at_start,
)
from sparsetron.train.checkpoint.folders import (
    CONFIG_FILE,
    DELETING_PREFIX,
    REPLACED_PREFIX,
    TMP_PREFIX,
    CheckpointError,
    _commit,
    _corrupt,
    _fsync_dir,
    _half_written,
    _read_marker,
    _read_metadata,
    _read_train_state,
    _torch_bytes,
    _write_bytes,
    _write_marker,
    is_complete,
    step_folder_name,
    train_state_file,
)
from sparsetron.train.checkpoint.group import _barrier, _distributed, _gather, _rank, _single_process_dcp, _world_size
from sparsetron.train.checkpoint.resume import ResumeFinder
from sparsetron.train.checkpoint.staging import _ReusedBuffers
from sparsetron.train.checkpoint.state import FORMAT_VERSION, OPTIONS, _check_fit, _optimizer_is_fresh, _state_dict


class CheckpointManager(ResumeFinder):
    """Saves, finds, verifies, loads and prunes the step folders under one checkpoint folder.

    `on_corrupt` ("fallback" or "error") is what `find_resume("auto")` does with a newest
    checkpoint that does not verify; `async_save` writes saves in the background; `timeout_s`
    is how long any one collective of a save or load may wait for the other ranks.
    """

    def __init__(
        self,
        folder: str | Path,
        keep_last: int = 0,
        on_corrupt: Literal["fallback", "error"] = "fallback",
        async_save: bool = False,
        timeout_s: float = 1800.0,
    ):
        self.folder = Path(folder)
        self.keep_last = keep_last
        self.on_corrupt = on_corrupt
        self.async_save = async_save
        # Created once, on every rank (new_group is collective): all of this package's collectives
        # use it, so a background save never interleaves with training collectives.
        timeout = datetime.timedelta(seconds=timeout_s)
        self.group = dist.new_group(backend="gloo", timeout=timeout) if _distributed() else None
        self._verified: set[Path] = set()
        self._committer: ThreadPoolExecutor | None = None
        self._pending: tuple[Path, Future] | None = None
        self._stager = _ReusedBuffers() if async_save else None
        self.checkpoint_bytes = 0
        """Estimated bytes of one checkpoint (`require_space`); 0 = unknown, saves do not check free space."""
        if _rank() == 0:
            self._recover()
        # Every rank looks for checkpoints only after rank 0 has finished restoring them.
        _barrier(self.group)

    # ---- saving --------------------------------------------------------------------

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        train_state: dict[str, Any],
        config_yaml: str,
    ) -> Path:
        """Write and commit `step_{step:08d}`; safe to call at any step, and again for the same step.

        Returns the folder's final name. With async_save the folder is committed later, in the
        background: the state is copied to CPU memory before this returns, so training may
        change it at once. A save first waits for the previous one to be committed.

        The small train_state files and config.yaml are written first, the tensors through
        DCP, and the marker with every file's size and checksum only once every rank's data
        is on disk; then the folder is renamed into place. An existing complete copy of the
        same step is swapped out only once the new one is complete (a kill inside the two
        renames of the swap is undone by the next manager built on this folder). After the
        commit the oldest complete checkpoints beyond `keep_last` are deleted (never the one
        just written, whose checksums were computed from the disk while committing it).
        A rank failing at any point makes every rank raise the same CheckpointError. Once
        `require_space` has been called, a save that would not fit on some rank's disk raises
        DiskFullError on every rank before anything is written, and a write that runs out of
        space raises DiskFullError in one line (see disk_space.py).
        """
        self.wait()
        rank = _rank()
        final = self.folder / step_folder_name(step)
        tmp = self.folder / f"{TMP_PREFIX}{final.name}"
        if self.checkpoint_bytes:
            free = self.least_free_bytes()
            if free < self.checkpoint_bytes:
                what = f"{final.name} was not saved; {self._newest_intact()}"
                raise DiskFullError(disk_full(NO_SPACE[1], self.folder, self.checkpoint_bytes, free, what))

        def prepare() -> None:
            if rank == 0:
                self.folder.mkdir(parents=True, exist_ok=True)
                # A leftover with this name is an earlier, interrupted save of this very step.
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()

        self._agree(final, "creating its temporary folder", prepare)
        fresh = _optimizer_is_fresh(optimizer)
        try:

            def write_small_files() -> None:
                _write_bytes(tmp / train_state_file(rank), _torch_bytes(train_state))
                if rank == 0:
                    _write_bytes(tmp / CONFIG_FILE, config_yaml.encode())

            self._agree(final, "writing the train state", write_small_files)
            state = _state_dict(model, optimizer)
            with _single_process_dcp():
                if self.async_save:
                    # Stages to CPU memory here; the returned future finishes the writing.
                    written = dcp.async_save(
                        state,
                        checkpoint_id=tmp,
                        process_group=self.group,
                        async_stager=self._stager,
                        no_dist=not _distributed(),
                    )
                else:
                    written = None
                    try:
                        dcp.save(state, checkpoint_id=tmp, process_group=self.group, no_dist=not _distributed())
                    except CheckpointException as err:
                        _reraise_interrupt(err)
                        raise self._save_error(final, f"saving {final} failed: {_summary(err)}") from err
            if fresh:
                # get_state_dict filled the optimizer's state by a zero step; undo it so
                # that saving does not change what the next optimizer step computes.
                optimizer.state.clear()
        except BaseException:
            if fresh:
                optimizer.state.clear()
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if written is None:
            self._finish(step, tmp, final, fresh, None)
        else:
            if self._committer is None:
                self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-commit")
            self._pending = (final, self._committer.submit(self._finish, step, tmp, final, fresh, written))
        return final

    def wait(self) -> Path | None:
        """Block until the save in flight (async_save) is committed; return its folder (None: none was pending).

        Its error, if it failed, is raised here, naming the checkpoint. Call before the
        process group is destroyed.
        """
        if self._pending is None:
            return None
        final, future = self._pending
        self._pending = None
        try:
            future.result()
        except CheckpointError:
            raise
        except (Exception, CheckpointException) as err:
            raise self._save_error(final, f"saving {final} in the background failed: {_summary(err)}") from err
        return final

    def _finish(self, step: int, tmp: Path, final: Path, fresh: bool, written: Future | None) -> None:
        """Wait for the tensor data, hash every file (each rank its share), write the marker, commit, prune."""
        rank, world = _rank(), _world_size()
        try:
            if written is not None:
                self._agree(final, "writing the tensor data", written.result)
            pooled = self._agree(final, "hashing the files", lambda: digest_share(tmp, rank, world))

            def commit() -> None:
                if rank != 0:
                    return
                digests = {name: entry for part in pooled for name, entry in part.items()}
                on_disk = {p.name for p in tmp.iterdir() if p.is_file()}
                if on_disk != set(digests):
                    raise OSError(f"files hashed {sorted(digests)} differ from the files in {tmp}: {sorted(on_disk)}")
                marker = {
                    "format": FORMAT_VERSION,
                    "step": step,
                    "time": time.time(),
                    "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "world_size": world,
                    "optimizer_fresh": fresh,
                    **marker_entries(digests),
                }
                _write_marker(tmp, marker)
                _fsync_dir(tmp)
                _commit(tmp, final)
                try:
                    self._prune(keep=final)
                except OSError as err:
                    # The new checkpoint is committed; a failed clean-up must not fail the save.
                    warnings.warn(f"checkpoint pruning in {self.folder} failed: {err}", stacklevel=2)

            self._agree(final, "committing it", commit)
        except BaseException:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _agree(self, final: Path, what: str, fn: Callable[[], Any]) -> list[Any]:
        """Run `fn` on this rank, then share its outcome with every rank (one small all-gather).

        Returns every rank's result, by rank; or, when any rank raised, every rank raises the
        same CheckpointError naming the failing ranks. Stands where a bare barrier would
        leave the other ranks waiting for a failed one until the timeout.
        """
        error: BaseException | None = None
        result = None
        try:
            result = fn()
        except (Exception, CheckpointException) as err:  # DCP's CheckpointException is a BaseException
            error = err
        pooled = _gather(self.group, (None if error is None else _summary(error), result))
        failed = [f"rank {r}: {message}" for r, (message, _) in enumerate(pooled) if message is not None]
        if failed:
            raise self._save_error(final, f"saving {final} failed while {what}: {'; '.join(failed)}") from error
        return [value for _, value in pooled]

    # ---- disk space (disk_space.py) --------------------------------------------------

    def require_space(self, nbytes: int) -> None:
        """Refuse now (DiskFullError, on every rank) unless one checkpoint of `nbytes` fits in the folder,
        and check again before every later save."""
        self.checkpoint_bytes = nbytes
        refusal = too_small_at_start(self.folder, nbytes, self.least_free_bytes())
        if refusal is not None:
            raise DiskFullError(refusal)

    def least_free_bytes(self) -> int:
        """The least free space any rank sees at the folder (a collective)."""
        return min(_gather(self.group, free_bytes(self.folder)))

    def _newest_intact(self) -> str:
        newest = self.latest()
        if newest is None:
            return "no earlier checkpoint exists"
        return f"the newest checkpoint, {newest.name}, is intact (free space, then --resume auto)"

    def _save_error(self, final: Path, message: str) -> CheckpointError:
        """The error of a failed save of `final`: a one-line DiskFullError where its disk ran out, else `message`."""
        cause = disk_full_cause(message, free_bytes(self.folder), self.checkpoint_bytes)
        if cause is None:
            return CheckpointError(message)
        what = f"{final.name} was not saved and its partial files are removed; {self._newest_intact()}"
        return DiskFullError(disk_full(cause, self.folder, self.checkpoint_bytes, None, what))

    def _prune(self, keep: Path) -> None:
        if self.keep_last <= 0:
            return
        for path in self.list_complete()[: -self.keep_last]:
            if path == keep:
                continue
            # Rename first so that a crash mid-delete never leaves a marked, partial folder.
            trash = path.with_name(f"{DELETING_PREFIX}{path.name}")
            shutil.rmtree(trash, ignore_errors=True)
            path.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)

    def _recover(self) -> None:
        """Finish what a process killed inside `_commit` or `_prune` left of this package's own scratch folders."""
        if not self.folder.is_dir():
            return
        for path in self.folder.iterdir():
            if path.name.startswith(REPLACED_PREFIX) and is_complete(path):
                original = path.with_name(path.name[len(REPLACED_PREFIX) :])
                if original.exists():
                    if is_complete(original):
                        shutil.rmtree(path, ignore_errors=True)
                else:
                    path.rename(original)
            elif path.name.startswith(DELETING_PREFIX):
                shutil.rmtree(path, ignore_errors=True)

    # ---- loading -------------------------------------------------------------------

    def load(
        self,
        path: str | Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> dict[str, Any]:
        """Read a complete step folder into `model` (and `optimizer`); return its train_state.

        Every file (its size and checksum, unless `find_resume` verified this folder
        already), the key set and every tensor shape are checked before anything is read
        into the model, so a corrupt checkpoint or one of another model raises
        CheckpointError and leaves the model as it was. Without an optimizer only the model is read.
        The train_state comes from this rank's file, else rank 0's (a resume at another
        world size), with tensors on the CPU.
        """
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {path} does not exist")
        if not is_complete(path):
            raise CheckpointError(_half_written(path))
        marker = _read_marker(path)
        if marker.get("format") != FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {path} has format {marker.get('format')}, this version reads format {FORMAT_VERSION} "
                "(optimizer state keyed by parameter name); it was written by an older sparsetron"
            )
        if path not in self._verified:
            problems, notes = self._verify(path)
            if problems:
                raise CheckpointError(_corrupt(path, problems) + "; nothing was loaded")
            for note in notes:
                warnings.warn(note, stacklevel=2)
        train_state = _read_train_state(path)
        metadata = _read_metadata(path)

        fresh = _optimizer_is_fresh(optimizer)
        try:
            state = _state_dict(model, optimizer)
            _check_fit(path, metadata, state, self.group)
            try:
                with _single_process_dcp():
                    dcp.load(state, checkpoint_id=path, process_group=self.group, no_dist=not _distributed())
            except (Exception, CheckpointException) as err:
                _reraise_interrupt(err)
                raise CheckpointError(
                    f"checkpoint {path}: reading the tensor data files (*.distcp) failed, corrupt? {_summary(err)}"
                ) from err
            if optimizer is None:
                set_model_state_dict(model, state["model"], options=OPTIONS)
            else:
                set_state_dict(
                    model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=OPTIONS
                )
        except BaseException:
            if fresh:
                optimizer.state.clear()
            raise
        if optimizer is not None and marker.get("optimizer_fresh"):
            # The saved optimizer had never stepped: so must the restored one.
            optimizer.state.clear()
        return train_state

    def read_config(self, path: str | Path) -> dict[str, Any]:
        """The job config saved with a checkpoint, as a mapping of sections."""
        file = Path(path) / CONFIG_FILE
        try:
            loaded = yaml.safe_load(file.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise CheckpointError(f"checkpoint {Path(path)}: cannot read {CONFIG_FILE}: {err}") from err
        if not isinstance(loaded, dict):
            raise CheckpointError(f"checkpoint {Path(path)}: {CONFIG_FILE} does not hold a mapping of sections")
        return loaded

    def read_train_state(self, path: str | Path) -> dict[str, Any]:
        """The train state saved with a checkpoint (this rank's, else rank 0's), without its tensors."""
        return _read_train_state(Path(path))


def _reraise_interrupt(err: BaseException) -> None:
    """Raise the Ctrl-C that DCP caught on this rank and wrapped into a CheckpointException: an
    interrupted save or load is the user's stop, not a checkpoint error."""
    if isinstance(err, CheckpointException):
        exc, _trace = err.failures.get(_rank(), (None, None))
        if isinstance(exc, KeyboardInterrupt):
            raise exc from None


def _summary(err: BaseException) -> str:
    """One line per failed rank instead of DCP's full tracebacks."""
    if not isinstance(err, CheckpointException):
        return f"{type(err).__name__}: {err}"
    parts = []
    for rank, (exc, _trace) in sorted(err.failures.items()):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        parts.append(f"rank {rank}: {type(exc).__name__}: {first}")
    return "; ".join(parts)
