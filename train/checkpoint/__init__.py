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
tensor is read (`find_resume`, `load`; see checksums.py). With
`on_corrupt="fallback"`, "auto" skips a checkpoint that does not verify for the newest
older one that does, and says so; nothing is deleted or renamed because of corruption.

In a multi-process job every rank calls `save`, `find_resume` and `load` (they are
collective); rank 0 alone creates, commits and prunes folders. The package's own
collectives run on a gloo group of its own, created once per manager, so that a save
writing in the background never shares a process group with training collectives. Where
a rank can fail (inside a save), the ranks agree on an error flag instead of meeting at a
bare barrier, so every rank raises the same CheckpointError naming the failing ranks
instead of waiting for a timeout (the same code path under NCCL: the flag travels on the
gloo group).

With `async_save=True`, `save` stages the state to CPU memory (DCP's `async_save`) and
returns; a background thread waits for the data files and commits the folder. The next
`save` and `wait()` block until that commit, and raise its error.

The package, one concern a module:

    folders.py     step folder names, finding complete ones, reading and writing their files, the commit
    resume.py      finding the folder to resume from and verifying it (CheckpointManager's base class)
    manager.py     CheckpointManager: save, asynchronous commit, prune, recover, load
    state.py       the state dicts saved and loaded, and whether a checkpoint fits the model
    staging.py     the stager of asynchronous saves, reusing its CPU buffers
    checksums.py   file sizes and checksums in the marker, hashing split over the ranks
    disk_space.py  a checkpoint's size, free space before each save, a full disk's one-line error
    group.py       the process-group helpers every collective here goes through
"""

from sparsetron.train.checkpoint.folders import CheckpointError, is_complete, list_complete, step_folder_name, step_of
from sparsetron.train.checkpoint.manager import CheckpointManager
from sparsetron.train.checkpoint.resume import ResumePoint

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "ResumePoint",
    "is_complete",
    "list_complete",
    "step_folder_name",
    "step_of",
]
