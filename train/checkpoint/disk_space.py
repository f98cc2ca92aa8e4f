"""Disk space for checkpoints: a save that cannot fit stops before it writes, and one that runs out
of space while writing says so in one line.

The size of a checkpoint is known before any is written: every parameter of the whole model and
its two AdamW moments, in fp32 (12 bytes a parameter; DCP writes a tensor replicated over ranks
once), plus the small train-state, config and metadata files, taken as 5% + 16 MiB more.

Every rank compares the free space it sees at the checkpoint folder (or the nearest existing
folder above it) with a whole checkpoint, and the ranks act on the least of them: on the shared
filesystem where a resumable checkpoint's files meet, that is what one save adds (older
checkpoints are pruned only after the new one is committed). Ranks writing to disks of their own
are asked for more than their share: the simple, conservative rule.

A write that fails all the same (another writer filled the disk) is recognised by its error:
ENOSPC or EDQUOT, or torch's zip writer's `[enforce fail at inline_container.cc] unexpected pos`
(which loses the errno) while less than a checkpoint (or, its size unknown, 16 MiB) is free. The save's temporary folder is
removed as after any failed save, and the previous complete checkpoint stays as it was.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from sparsetron.parallel.memory import ADAMW_STATES, FP32, format_bytes
from sparsetron.train.checkpoint.folders import CheckpointError
from sparsetron.train.run_folder import nearest_existing

MARGIN = 1.05
SMALL_FILES = 16 << 20
# What each failure looks like in the one-line summaries a failed save gathers from its ranks.
NO_SPACE = (os.strerror(errno.ENOSPC), "disk full")
QUOTA = (os.strerror(errno.EDQUOT), "disk quota exceeded")
ZIP_WRITER_SHORT_WRITE = "unexpected pos"


class DiskFullError(CheckpointError):
    """A checkpoint does not fit on the disk of its folder; the previous checkpoint is untouched."""


def checkpoint_bytes(parameters: int) -> int:
    """Estimated bytes of one checkpoint of a model with `parameters` parameters (see the module docstring)."""
    return int(parameters * (1 + ADAMW_STATES) * FP32 * MARGIN) + SMALL_FILES


def free_bytes(folder: Path) -> int:
    """Bytes free for an unprivileged writer on the filesystem that holds (or will hold) `folder`."""
    return shutil.disk_usage(nearest_existing(Path(folder))).free


def too_small_at_start(folder: Path, needed: int, free: int) -> str | None:
    """The refusal of a run whose checkpoint folder cannot hold even one checkpoint, else None."""
    if free >= needed:
        return None
    return f"checkpoint.folder {folder} has {format_bytes(free)} free, a checkpoint needs about {format_bytes(needed)}"


def disk_full(cause: str, folder: Path, needed: int, free: int | None, what: str) -> str:
    """One line for a save that cannot be, or could not be, written: `cause` ("disk full", ...) at
    `folder`, the bytes it needs (0: unknown) and has (None: not said), then `what` became of it."""
    figures = [f"{format_bytes(needed)} needed"] if needed else []
    figures += [f"{format_bytes(free)} free"] if free is not None else []
    return f"{cause} at {folder}" + (f": {', '.join(figures)}" if figures else "") + f"; {what}"


def disk_full_cause(summary: str, free: int, needed: int) -> str | None:
    """What a failed save's error `summary` says of the disk: "disk full" or "disk quota exceeded", else None."""
    for marker, cause in (NO_SPACE, QUOTA):
        if marker in summary:
            return cause
    # A disk that filled up is left with almost nothing free (the partial files fill it).
    if ZIP_WRITER_SHORT_WRITE in summary and free < max(needed, SMALL_FILES):
        return NO_SPACE[1]
    return None
