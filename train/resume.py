"""What resuming needs beyond the checkpoint files: random states, and whether the
job being resumed still fits the checkpoint.

A resumed job may change how it trains (learning rate, schedule length, balancing
coefficients, logging): those changes take effect and are listed. It may not change
what the checkpoint's tensors or saved read position mean: parameter shapes, or the
data that the read position indexes. Those are refused, naming every key at fault.
The global batch may change only when trainer.global_batch_size says so: one that a new
layout would change by itself (trainer.global_batch_size 0) is refused. The same global
batch on another layout reads on exactly where the checkpoint stopped (train/data/batch.py).
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import torch

from sparsetron.model.config import ConfigError
from sparsetron.train.config import JobConfig
from sparsetron.train.config_io import from_dict, to_dict

# What the fixed fields of each section pin down (SHAPE_FIELDS / POSITION_FIELDS on its class).
FIXES = {
    "model": "the checkpoint's parameter shapes",
    "attention": "the checkpoint's parameter shapes",
    "moe": "the checkpoint's parameter shapes",
    "data": "the saved data position",
}


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def train_state(
    step: int = 0,
    tokens_seen: int = 0,
    nonfinite_in_a_row: int = 0,
    skipped_steps: int = 0,
    loader: dict | None = None,
) -> dict:
    """The train state a checkpoint holds (what the trainer reads back on resume); the defaults
    describe a run that has not taken a step, its data read from the start."""
    return {
        "step": step,
        "tokens_seen": tokens_seen,
        "nonfinite_in_a_row": nonfinite_in_a_row,
        "skipped_steps": skipped_steps,
        "loader": loader if loader is not None else {"epoch": 0, "index": 0},
        "rng": rng_state(),
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fixed_fields(section: object) -> tuple[str, ...]:
    cls = type(section)
    return getattr(cls, "SHAPE_FIELDS", ()) + getattr(cls, "POSITION_FIELDS", ())


def compare_with_checkpoint(
    job: JobConfig, saved: dict, path: Path, global_batch_from_layout: bool = False
) -> list[str]:
    """Refuse a checkpoint that `job` cannot continue; return the settings it changes.

    `saved` is the checkpoint's config.yaml as a mapping, and `job` has its global batch resolved
    (train/global_batch.py); `global_batch_from_layout` says that the job's trainer.global_batch_size
    was 0, so that its layout set the batch. Raises ConfigError listing every field that fixes
    parameter shapes or the data position and differs, or naming a global batch the layout
    changed; returns lines "section.key: old -> new" for every other difference.
    """
    try:
        previous = from_dict(JobConfig, saved, "")
    except ConfigError as err:
        raise ConfigError(f"checkpoint {path}: its saved config.yaml does not load: {err}") from err
    old_batch = previous.trainer.global_batch_size  # 0: a checkpoint that did not record it
    if global_batch_from_layout and old_batch not in (0, job.trainer.global_batch_size):
        _refuse_global_batch_change(old_batch, job, path)
    refused, changed = [], []
    for section in dataclasses.fields(JobConfig):
        old, new = getattr(previous, section.name), getattr(job, section.name)
        fixed = _fixed_fields(new)
        for key, new_value in to_dict(new).items():
            old_value = getattr(old, key)
            if old_value == new_value or (section.name, key, old_value) == ("trainer", "global_batch_size", 0):
                continue
            line = f"{section.name}.{key}: checkpoint {old_value!r}, config {new_value!r}"
            if key in fixed:
                refused.append(f"{line} (fixes {FIXES[section.name]})")
            else:
                changed.append(f"{section.name}.{key}: {old_value!r} -> {new_value!r}")
    warmup = [cfg.schedule.warmup_for(cfg.trainer.steps) for cfg in (previous, job)]
    if warmup[0] != warmup[1] or previous.schedule.warmup_steps != job.schedule.warmup_steps:
        # A fractional warm-up moves with trainer.steps; a count and a fraction may give the same steps.
        changed.append(f"warm-up steps (schedule.warmup_steps of trainer.steps): {warmup[0]} -> {warmup[1]}")
    if refused:
        raise ConfigError(
            f"checkpoint {path} was written by a different model or data setup; it was not loaded:\n  "
            + "\n  ".join(refused)
        )
    return changed


def _refuse_global_batch_change(old_batch: int, job: JobConfig, path: Path) -> None:
    tc = job.trainer
    dp = tc.global_batch_size // (tc.micro_batch_size * tc.grad_accum_steps)
    raise ConfigError(
        f"trainer.global_batch_size: checkpoint {path} trained {old_batch} sequences per step, and this layout "
        f"would train {tc.global_batch_size} (micro_batch_size {tc.micro_batch_size} x grad_accum_steps "
        f"{tc.grad_accum_steps} x data-parallel degree {dp}); set trainer.global_batch_size={old_batch} to keep "
        f"the batch, or trainer.global_batch_size={tc.global_batch_size} to change it"
    )
