"""A micro-batch of token windows, as the step runner takes it, and which of a step's windows
each micro-batch of each data-parallel rank holds."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sparsetron.train.data.errors import DataError

__all__ = ["Batch", "StepShape", "batch_of"]


@dataclass
class Batch:
    """One micro-batch; every tensor int64 [B, S]."""

    tokens: torch.Tensor
    """Input token ids."""
    targets: torch.Tensor
    """The next token of each input position (IGNORE_TARGET where the loss skips it)."""
    doc_ids: torch.Tensor
    """Document of each input token, numbered from 0 within its sequence."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in (self.tokens, self.targets, self.doc_ids)))


def batch_of(arrays: tuple[np.ndarray, np.ndarray, np.ndarray]) -> Batch:
    """A Batch of (inputs, targets, doc_ids) arrays, as a dataset's `gather` returns them."""
    return Batch(*(torch.from_numpy(a) for a in arrays))


@dataclass(frozen=True)
class StepShape:
    """How one rank reads a step's global batch of G = B x W x A windows (B = micro_batch_size,
    W = data-parallel ranks, A = grad_accum_steps): its micro-batch m holds the step's windows
    m B W + r, m B W + r + W, ... (B of them) on rank r.

    Micro-batch m of all ranks together is the step's m-th block of B W windows, and the whole
    step is all G of them: which windows a step trains on depends on G alone, not on how a layout
    splits it, and a layout with the same B W per micro-batch also groups them alike.
    """

    micro_batch_size: int
    grad_accum_steps: int = 1
    rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        for name in ("micro_batch_size", "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise DataError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.rank < self.world_size:
            raise DataError(f"rank {self.rank} out of range for world_size {self.world_size}")

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.world_size * self.grad_accum_steps

    def describe(self) -> str:
        return (
            f"micro_batch_size {self.micro_batch_size} x grad_accum_steps {self.grad_accum_steps} "
            f"x data-parallel {self.world_size} = {self.global_batch}"
        )

    def positions(self) -> np.ndarray:
        """This rank's positions in the step's global batch [A, B]: row m is its micro-batch m."""
        per_micro_batch = self.micro_batch_size * self.world_size
        step = np.arange(self.global_batch).reshape(self.grad_accum_steps, per_micro_batch)
        return step[:, self.rank :: self.world_size]
