"""Checkpoints: one committed folder per step, written through torch.distributed.checkpoint.

A checkpoint folder looks like

    <folder>/step_00000300/
        __0_0.distcp, .metadata     model + optimizer (DCP, keyed by parameter FQN)
        train_state_rank0.pt        step, tokens, scheduler, data position, RNG, counters
        config.yaml                 the resolved job config
        .complete                   JSON marker, written last: every file's size and checksum

Model and optimizer state go through DCP with every parameter described as a global
tensor, so a checkpoint written at one parallel layout loads at another. The folder
is written under a hidden temporary name and renamed into place only after every file
and the marker are on disk: a folder named `step_*` that holds the marker is complete,
anything else is ignored (and never deleted automatically).

Resuming checks every file against the sizes and checksums of the marker before any
tensor is read (`find_resume`, `load`; see train/checkpoint_verify.py). With
`on_corrupt="fallback"`, "auto" skips a checkpoint that does not verify for the newest
older one that does, and says so; nothing is deleted or renamed because of corruption.

In a multi-process job every rank calls `save`, `find_resume` and `load` (they are
collective); rank 0 alone creates, commits and prunes folders. The module's own
collectives run on a gloo group of its own, created once per manager, so that a save
writing in the background never shares a process group with training collectives. Where
a rank can fail (inside a save), the ranks agree on an error flag instead of meeting at a
bare barrier, so every rank raises the same CheckpointError naming the failing ranks
instead of waiting for a timeout (the same code path under NCCL: the flag travels on the
gloo group).

With `async_save=True`, `save` stages the state to CPU memory (DCP's `async_save`) and
returns; a background thread waits for the data files and commits the folder. The next
`save` and `wait()` block until that commit, and raise its error.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from sparsetron.train.checkpoint_verify import digest_share, has_checksums, marker_entries, verify_share

__all__ = ["CheckpointError", "CheckpointManager", "ResumePoint", "is_complete", "list_complete", "step_of"]

MARKER = ".complete"
CONFIG_FILE = "config.yaml"
METADATA_FILE = ".metadata"
FORMAT_VERSION = 2
"""2: optimizer state keyed by parameter name (layout-independent); 1 keyed it by param group."""
# Optimizer state and hyperparameters keyed by parameter name, not by param-group index: the
# groups differ between layouts (they are split by device mesh), the names do not.
OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
STEP_RE = re.compile(r"^step_(\d+)$")
# Hidden prefixes of this module's own scratch folders; none of them matches STEP_RE.
TMP_PREFIX = ".tmp_"
REPLACED_PREFIX = ".replaced_"
DELETING_PREFIX = ".deleting_"
INCOMPLETE_PREFIX = ".incomplete_"
ABANDONED_PREFIX = "abandoned_"
# Longest list of keys quoted in one error message.
MAX_LISTED = 12


class CheckpointError(RuntimeError):
    """A checkpoint is missing, half-written, corrupt or does not fit the model; the message names the folder."""


@dataclass
class ResumePoint:
    """What `find_resume` chose: the step folder to load (None: start fresh) and what to tell the user."""

    path: Path | None
    messages: list[str] = field(default_factory=list)


def step_folder_name(step: int) -> str:
    return f"step_{step:08d}"


def train_state_file(rank: int) -> str:
    return f"train_state_rank{rank}.pt"


def step_of(path: Path) -> int | None:
    """The step a `step_*` folder name encodes, else None."""
    match = STEP_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def list_complete(folder: Path) -> list[Path]:
    """Complete step folders directly under `folder`, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and step_of(p) is not None and is_complete(p)]
    return sorted(found, key=lambda p: step_of(p))


class CheckpointManager:
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
        # Created once, on every rank (new_group is collective): all of this module's collectives
        # use it, so a background save never interleaves with training collectives.
        timeout = datetime.timedelta(seconds=timeout_s)
        self.group = dist.new_group(backend="gloo", timeout=timeout) if _distributed() else None
        self._verified: set[Path] = set()
        self._committer: ThreadPoolExecutor | None = None
        self._pending: tuple[Path, Future] | None = None
        self._stager = _ReusedBuffers() if async_save else None
        if _rank() == 0:
            self._recover()
        # Every rank looks for checkpoints only after rank 0 has finished restoring them.
        _barrier(self.group)

    # ---- finding -------------------------------------------------------------------

    def list_complete(self) -> list[Path]:
        return list_complete(self.folder)

    def latest(self) -> Path | None:
        complete = self.list_complete()
        return complete[-1] if complete else None

    def resolve(self, resume: str) -> Path | None:
        """`find_resume(resume).path`: the verified step folder to resume from, or None."""
        return self.find_resume(resume).path

    def find_resume(self, resume: str) -> ResumePoint:
        """Turn `checkpoint.resume`-style input into a complete step folder that verifies.

        "auto" gives the newest complete checkpoint (None when there is none); "" and
        "none" give None. Anything else is a path: a complete step folder, or a folder
        of step folders (its newest complete one). A relative path that does not exist
        is also tried below this manager's folder, so "step_00000300" works.

        Every file is checked against the marker's sizes and checksums before anything is
        loaded. A named folder that does not verify is an error. Under "auto" a newest
        checkpoint that does not verify is an error with on_corrupt="error"; with
        "fallback" the newest older one that verifies is chosen and the messages say which
        was skipped and why. Every complete checkpoint failing is always an error. Nothing
        on disk is changed here (resuming from an older checkpoint sets the newer ones
        aside afterwards: `set_aside_after`).
        """
        if resume in ("", "none"):
            return ResumePoint(None)
        if resume == "auto":
            return self._newest_verified()
        path = self._named(resume)
        problems, notes = self._verify(path)
        if problems:
            raise CheckpointError(_corrupt(path, problems) + "; nothing was loaded")
        return ResumePoint(path, notes)

    def _named(self, resume: str) -> Path:
        path = Path(resume).expanduser()
        if not path.exists() and not path.is_absolute() and (self.folder / path).exists():
            path = self.folder / path
        if not path.exists():
            raise CheckpointError(f"checkpoint {path} does not exist")
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {path} is a file, not a step folder (step_NNNNNNNN/)")
        if is_complete(path):
            return path
        if step_of(path) is not None:
            raise CheckpointError(_half_written(path))
        inside = list_complete(path)
        if inside:
            return inside[-1]
        raise CheckpointError(
            f"checkpoint {path} is not a step folder (step_NNNNNNNN/ holding {MARKER}) "
            "and holds no complete step folder"
        )

    def _newest_verified(self) -> ResumePoint:
        complete = self.list_complete()
        messages: list[str] = []
        for path in reversed(complete):
            problems, notes = self._verify(path)
            if not problems:
                if messages:
                    messages.append(
                        f"resuming from {path.name}, the newest checkpoint that verifies "
                        "(checkpoint.on_corrupt=fallback); the newer ones stay on disk"
                    )
                return ResumePoint(path, messages + notes)
            report = _corrupt(path, problems)
            if self.on_corrupt == "error":
                raise CheckpointError(
                    f"{report}; checkpoint.on_corrupt=error: not falling back to an older checkpoint "
                    "(resume one by name, or set checkpoint.on_corrupt=fallback); nothing was loaded or changed"
                )
            messages.append(f"skipping a corrupt checkpoint: {report}")
        if complete:
            raise CheckpointError(
                f"no complete checkpoint in {self.folder} verifies; nothing was loaded or changed:\n  "
                + "\n  ".join(messages)
            )
        return ResumePoint(None)

    def _verify(self, path: Path) -> tuple[list[str], list[str]]:
        """(problems, notes) of a complete step folder, every rank hashing its share of the files.

        One all-gather pools the ranks' findings, so every rank returns the same verdict.
        """
        rank, world = _rank(), _world_size()

        def check() -> tuple[list[str], bool]:
            try:
                marker = _read_marker(path)
            except CheckpointError as err:
                return [str(err).removeprefix(f"checkpoint {path}: ")], True
            return verify_share(path, marker, rank, world), has_checksums(marker)

        pooled = _gather(self.group, check())
        problems = sorted({line for lines, _ in pooled for line in lines})
        notes = []
        if not problems:
            self._verified.add(path)
            if not all(checked for _, checked in pooled):
                notes.append(
                    f"checkpoint {path} records no checksums (written before sparsetron recorded them): "
                    "only its file sizes were verified"
                )
        return problems, notes

    def set_aside_after(self, step: int) -> list[Path]:
        """Rename complete checkpoints newer than `step` to `abandoned_<time>_step_N`.

        Resuming from an older checkpoint starts a new branch of the run; its saves must
        neither overwrite the old branch's folders nor have `latest()` pick them up. They are
        kept on disk under a name no lookup matches (also the corrupt ones a fallback skipped:
        `keep_last` then never counts them, nor prunes older verified checkpoints for them).
        Returns their new paths.
        """
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        newer = [path for path in self.list_complete() if step_of(path) > step]
        moved = [path.with_name(f"{ABANDONED_PREFIX}{stamp}_{path.name}") for path in newer]
        _barrier(self.group)  # every rank has listed the folder before rank 0 renames
        if _rank() == 0:
            for path, target in zip(newer, moved, strict=True):
                path.rename(target)
        _barrier(self.group)
        return moved

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
        A rank failing at any point makes every rank raise the same CheckpointError.
        """
        self.wait()
        rank = _rank()
        final = self.folder / step_folder_name(step)
        tmp = self.folder / f"{TMP_PREFIX}{final.name}"

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
                        raise CheckpointError(f"saving {final} failed: {_summary(err)}") from err
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
        except Exception as err:
            raise CheckpointError(f"saving {final} in the background failed: {_summary(err)}") from err
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
        except Exception as err:
            error = err
        pooled = _gather(self.group, (None if error is None else _summary(error), result))
        failed = [f"rank {r}: {message}" for r, (message, _) in enumerate(pooled) if message is not None]
        if failed:
            raise CheckpointError(f"saving {final} failed while {what}: {'; '.join(failed)}") from error
        return [value for _, value in pooled]

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
        """Finish what a process killed inside `_commit` or `_prune` left of this module's own scratch folders."""
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


# ---- state dicts and checks ----------------------------------------------------------


class _ReusedBuffers(AsyncStager):
    """Stages a state dict into CPU tensors kept from the previous save of the same layout.

    DCP's default stager allocates fresh CPU memory at every save, and the first touch of
    that memory costs as much as the copy; reusing the buffers leaves the copy alone in the
    time the training loop is blocked. Safe because a save waits for the previous one's
    writing before it stages. Costs one CPU copy of the state for the manager's life.
    """

    _synchronize_after_execute = False

    def __init__(self) -> None:
        self.buffers: dict[str, Any] | None = None
        self.layout: dict[str, Any] | None = None

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        layout = {
            key: (tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else type(value)
            for key, value in _flatten(state_dict, "", {}).items()
        }
        if layout != self.layout:
            self.buffers, self.layout = _create_cpu_state_dict(state_dict), layout
        return _copy_state_dict(state_dict, self.buffers)

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def _state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    if optimizer is None:
        return {"model": get_model_state_dict(model, options=OPTIONS)}
    model_sd, optim_sd = get_state_dict(model, optimizer, options=OPTIONS)
    return {"model": model_sd, "optim": optim_sd}


def _optimizer_is_fresh(optimizer: torch.optim.Optimizer | None) -> bool:
    return optimizer is not None and not optimizer.state


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    """Leaves of a nested state dict under DCP's own dotted names (lists index by position)."""
    if isinstance(value, dict):
        for key, child in value.items():
            _flatten(child, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for index, child in enumerate(value):
            _flatten(child, f"{prefix}.{index}", out)
    else:
        out[prefix] = value
    return out


def _check_fit(path: Path, metadata: Any, state: dict[str, Any], group: dist.ProcessGroup | None) -> None:
    """Compare key sets and global shapes with the checkpoint's metadata, before any tensor is read.

    Pipeline stages each ask for their own part of the model, so the key sets of every rank
    are pooled (one small all-gather) before judging what is missing or unexpected; every
    rank then raises the same error, or none does.
    """
    expected = _flatten(state, "", {})
    sections = tuple(f"{name}." for name in state)
    saved = {k: v for k, v in metadata.state_dict_metadata.items() if k.startswith(sections)}
    mismatched = []
    for key in sorted(expected.keys() & saved.keys()):
        want, have = expected[key], saved[key]
        want_tensor = isinstance(want, torch.Tensor)
        have_tensor = isinstance(have, TensorStorageMetadata)
        if want_tensor != have_tensor:
            mismatched.append(f"{key}: checkpoint holds {'a tensor' if have_tensor else 'a non-tensor value'}")
        elif want_tensor and tuple(want.shape) != tuple(have.size):
            mismatched.append(f"{key}: checkpoint {list(have.size)} vs model {list(want.shape)}")
    wanted = set(expected)
    if _distributed():
        pooled = _gather(group, (wanted, mismatched))
        wanted = set().union(*(keys for keys, _ in pooled))
        mismatched = sorted(set().union(*(problems for _, problems in pooled)))
    missing = sorted(k for k in wanted if k not in saved)
    unexpected = sorted(k for k in saved if k not in wanted)
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {path} does not fit the model (nothing was loaded):"]
        if mismatched:
            lines.append(f"  shape mismatch:{_listing(mismatched)}")
        if missing:
            lines.append(f"  missing from the checkpoint:{_listing(missing)}")
        if unexpected:
            lines.append(f"  unexpected in the checkpoint:{_listing(unexpected)}")
        raise CheckpointError("\n".join(lines))


def _summary(err: BaseException) -> str:
    """One line per failed rank instead of DCP's full tracebacks."""
    if not isinstance(err, CheckpointException):
        return f"{type(err).__name__}: {err}"
    parts = []
    for rank, (exc, _trace) in sorted(err.failures.items()):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        parts.append(f"rank {rank}: {type(exc).__name__}: {first}")
    return "; ".join(parts)


def _listing(items: list[str]) -> str:
    shown = items[:MAX_LISTED] + ([f"... and {len(items) - MAX_LISTED} more"] if len(items) > MAX_LISTED else [])
    return "".join(f"\n    {item}" for item in shown)


def _corrupt(path: Path, problems: list[str]) -> str:
    return f"checkpoint {path} does not verify against its {MARKER} marker: " + "; ".join(problems)


def _half_written(path: Path) -> str:
    return (
        f"checkpoint {path} lacks the {MARKER} marker: it is half-written (its save was interrupted) "
        "and cannot be loaded; resume from another step folder or 'auto'"
    )


# ---- reading files -------------------------------------------------------------------


def _read_marker(path: Path) -> dict[str, Any]:
    try:
        marker = json.loads((path / MARKER).read_text())
        if not isinstance(marker, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: marker file {MARKER} is unreadable: {err}") from err
    return marker


def _read_train_state(path: Path) -> dict[str, Any]:
    file = path / train_state_file(_rank())
    if not file.is_file():
        file = path / train_state_file(0)
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path}: file {file.name} is missing")
    try:
        # Our own file: it holds arbitrary Python objects, hence weights_only=False.
        state = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path}: file {file.name} is corrupt or truncated: {err}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: file {file.name} does not hold a dict")
    return state


def _read_metadata(path: Path) -> Any:
    try:
        return FileSystemReader(str(path)).read_metadata()
    except Exception as err:
        raise CheckpointError(f"checkpoint {path}: file {METADATA_FILE} is corrupt or missing: {err}") from err


# ---- writing files -------------------------------------------------------------------


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _write_bytes(file: Path, data: bytes) -> None:
    with open(file, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _write_marker(folder: Path, marker: dict[str, Any]) -> None:
    _write_bytes(folder / MARKER, json.dumps(marker, indent=1).encode())


def _fsync_file(file: Path) -> None:
    with open(file, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    # A rename is durable only once its directory is synced; some platforms cannot open directories.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, final: Path) -> None:
    """Rename a finished temporary folder into place, keeping any older complete copy until then."""
    replaced = None
    if final.exists():
        if is_complete(final):
            replaced = final.with_name(f"{REPLACED_PREFIX}{final.name}")
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            # Not ours to delete: move the stranger aside, keeping its contents.
            replaced_name = f"{INCOMPLETE_PREFIX}{final.name}_{time.strftime('%Y%m%d-%H%M%S')}"
            warnings.warn(f"{final} had no {MARKER} marker; moved it to {replaced_name}", stacklevel=3)
            final.rename(final.with_name(replaced_name))
        if replaced is not None:
            final.rename(replaced)
    tmp.rename(final)
    _fsync_dir(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


# ---- process group -------------------------------------------------------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def _barrier(group: dist.ProcessGroup | None) -> None:
    if _distributed():
        dist.barrier(group=group)


def _gather(group: dist.ProcessGroup | None, value: Any) -> list[Any]:
    """Every rank's `value`, by rank (one all_gather_object on `group`); [value] in one process."""
    if not _distributed():
        return [value]
    pooled: list[Any] = [None] * _world_size()
    dist.all_gather_object(pooled, value, group=group)
    return pooled


@contextmanager
def _single_process_dcp() -> Iterator[None]:
    # DCP warns on every call without a process group even when told no_dist=True.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# The same warning from the thread in which DCP's async_save writes, which no context of ours covers.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
