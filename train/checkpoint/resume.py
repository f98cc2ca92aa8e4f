"""Finding the checkpoint to resume from: "auto", a named folder, the fallback past corrupt ones, verification.

`ResumeFinder` is CheckpointManager's base class: the manager's finding half, apart from its
saving and loading half (manager.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch.distributed as dist

from sparsetron.train.checkpoint.checksums import has_checksums, verify_share
from sparsetron.train.checkpoint.folders import (
    ABANDONED_PREFIX,
    MARKER,
    CheckpointError,
    _corrupt,
    _half_written,
    _read_marker,
    is_complete,
    list_complete,
    step_of,
)
from sparsetron.train.checkpoint.group import _barrier, _gather, _rank, _world_size


@dataclass
class ResumePoint:
    """What `find_resume` chose: the step folder to load (None: start fresh) and what to tell the user."""

    path: Path | None
    messages: list[str] = field(default_factory=list)


class ResumeFinder:
    """Lists, finds, verifies and sets aside the step folders under `folder`; CheckpointManager builds on it.

    Uses the attributes CheckpointManager.__init__ sets: `folder`, `on_corrupt`, `group`
    (the checkpoint collectives' own) and `_verified` (the folders that verified already).
    """

    folder: Path
    on_corrupt: Literal["fallback", "error"]
    group: dist.ProcessGroup | None
    _verified: set[Path]

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
