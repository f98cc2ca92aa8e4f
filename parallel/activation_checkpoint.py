"""Activation checkpointing: recompute each transformer block in the backward."""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper


def apply_ac(model: nn.Module) -> None:
    """Wrap every block of `model.layers` and of the multi-token prediction depths in a
    non-reentrant checkpoint.

    The wrapper's prefix is stripped from state-dict keys by torch, so checkpoints
    written with and without activation checkpointing are interchangeable.
    """
    for name, block in list(model.layers.items()):
        if block is not None:
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)
    if model.mtp is not None:
        for layer in model.mtp.layers.values():
            layer.block = checkpoint_wrapper(layer.block, preserve_rng_state=False)
