"""Learning-rate schedules as a multiplier of the peak rate, one value per step.

Step s (0-based) is the step about to be taken: the first W steps ramp linearly up
to the peak (W = schedule.warmup_steps, or that fraction of the run when below 1), and
the last step of the run takes the final value.
"""

from __future__ import annotations

import math

import torch

from sparsetron.train.config import ScheduleConfig


def lr_multiplier(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    """The fraction of the peak learning rate used at `step` of `total_steps`."""
    warmup = cfg.warmup_for(total_steps)
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if cfg.kind == "constant":
        return 1.0
    last = max(total_steps - 1, 1)
    if cfg.kind == "cosine":
        span = max(last - warmup, 1)
        progress = min(max(step - warmup, 0) / span, 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd: stable at the peak, then a linear decay over the last decay_fraction of the run.
    decay_steps = max(round(cfg.decay_fraction * total_steps), 1)
    decay_start = max(total_steps - decay_steps, warmup)
    if step < decay_start:
        return 1.0
    progress = min((step - decay_start + 1) / max(last - decay_start + 1, 1), 1.0)
    return 1.0 - (1 - cfg.min_lr_ratio) * progress


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int, start_step: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR positioned to give the learning rate of step `start_step` next.

    A resumed run builds it from the step count rather than loading its state, so a
    changed optimizer.lr, schedule or trainer.steps takes effect.
    """
    if start_step > 0:
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(cfg, step, total_steps), last_epoch=start_step - 1
    )
