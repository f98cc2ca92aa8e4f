"""A micro-batch of token windows, as the step runner takes it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Batch", "batch_of"]


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
