"""Apply the parallel layout to a plain model, in one fixed order.

Order: activation checkpointing, then compile (so the compiled region contains the
recomputation boundary). Multi-process axes (FSDP2/HSDP, tensor, context, expert,
pipeline) are not implemented yet: `check_single_process` refuses them by name
before any expensive work.
"""

from __future__ import annotations

from torch import nn

from sparsetron.model.config import ConfigError
from sparsetron.parallel.activation_checkpoint import apply_ac
from sparsetron.parallel.compile import apply_compile
from sparsetron.parallel.config import AXES, ParallelConfig


def check_single_process(cfg: ParallelConfig, world_size: int) -> None:
    """Refuse layouts this version cannot run, naming the key or the world size at fault."""
    for axis in AXES:
        if getattr(cfg, axis) != 1:
            raise ConfigError(
                f"parallel.{axis}={getattr(cfg, axis)}: multi-process parallel layouts are not implemented yet; "
                "this version trains in one process (set it to 1)"
            )
    if world_size != 1:
        raise ConfigError(
            f"launched with WORLD_SIZE={world_size}, but this version trains in one process; "
            "run `sparsetron train` without torchrun"
        )


def parallelize(model: nn.Module, cfg: ParallelConfig) -> nn.Module:
    """Apply activation checkpointing and compilation as `cfg` asks; returns the same model."""
    if cfg.activation_checkpointing == "full":
        apply_ac(model)
    if cfg.compile:
        apply_compile(model)
    return model
