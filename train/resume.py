"""What resuming needs beyond the checkpoint files: random states, and whether the
job being resumed still fits the checkpoint.

A resumed job may change how it trains (learning rate, schedule length, balancing
coefficients, logging): those changes take effect and are listed. It may not change
what the checkpoint's tensors or saved read position mean: parameter shapes, or the
data that the read position indexes. Those are refused, naming every key at fault.
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


def compare_with_checkpoint(job: JobConfig, saved: dict, path: Path) -> list[str]:
    """Refuse a checkpoint that `job` cannot continue; return the settings it changes.

    `saved` is the checkpoint's config.yaml as a mapping. Raises ConfigError listing every
    field that fixes parameter shapes or the data position and differs; returns lines
    "section.key: old -> new" for every other difference.
    """
    try:
        previous = from_dict(JobConfig, saved, "")
    except ConfigError as err:
        raise ConfigError(f"checkpoint {path}: its saved config.yaml does not load: {err}") from err
    refused, changed = [], []
    for section in dataclasses.fields(JobConfig):
        old, new = getattr(previous, section.name), getattr(job, section.name)
        fixed = _fixed_fields(new)
        for key, new_value in to_dict(new).items():
            old_value = getattr(old, key)
            if old_value == new_value:
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
