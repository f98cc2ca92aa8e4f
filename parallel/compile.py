"""torch.compile, applied per transformer block (the multi-token prediction depths' too)."""

from __future__ import annotations

from torch import nn


def apply_compile(model: nn.Module) -> None:
    """Compile each block in place; every block has the same structure, so one graph is reused.

    `nn.Module.compile` keeps parameter names, so checkpoints are unaffected.
    """
    for block in model.layers.values():
        if block is not None:
            block.compile()
    if model.mtp is not None:
        for block in model.mtp.blocks():
            block.compile()
