"""A step-0 checkpoint of weights made outside training (imported from Hugging Face, upcycled),
which `sparsetron train ... --resume` continues with a fresh optimizer and fresh data; or, for
`sparsetron upcycle --continue`, the same at the step of a run whose train state it continues."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from torch import nn

from sparsetron.train.checkpoint import CheckpointManager
from sparsetron.train.config import JobConfig
from sparsetron.train.config_io import dump_yaml
from sparsetron.train.optim import build_optimizer
from sparsetron.train.resume import train_state
from sparsetron.train.schedule import build_scheduler


def save_step0(
    manager: CheckpointManager,
    model: nn.Module,
    job: JobConfig,
    after_save: Callable[[], None] | None = None,
    state: dict | None = None,
) -> Path:
    """Save `model` as step 0 of `job` in `manager`'s folder with a never-stepped optimizer; returns
    the step folder. `state`, a train state (train/resume.py), saves at its step instead. `after_save` writes any companion file; if anything fails, what this call
    wrote is removed again (the folder, if it created it), so a failed run leaves nothing behind."""
    optimizer = build_optimizer(model, job.optimizer)
    # The scheduler adds initial_lr to the param groups, which a resumed trainer's optimizer holds.
    build_scheduler(optimizer, job.schedule, job.trainer.steps)
    created = not manager.folder.exists()
    written = None
    try:
        state = state if state is not None else train_state()
        written = manager.save(state["step"], model, optimizer, state, dump_yaml(job))
        if after_save is not None:
            after_save()
    except BaseException:
        # Also the step folder in a folder that existed (empty) before: a retry must find it empty.
        for leftover in [manager.folder] if created else [written] if written is not None else []:
            shutil.rmtree(leftover, ignore_errors=True)
        raise
    return written
