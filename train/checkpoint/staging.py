"""Staging of asynchronous saves: the state copied to CPU memory, into buffers kept between saves."""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
from torch.distributed.checkpoint.staging import AsyncStager

from sparsetron.train.checkpoint.state import _flatten


class _ReusedBuffers(AsyncStager):
    """Stages a state dict into CPU tensors kept from the previous save of the same layout.

    DCP's default stager allocates fresh CPU memory at every save, and the first touch of
    that memory costs as much as the copy; reusing the buffers leaves the copy alone in the
    time the training loop is blocked. Safe because a save waits for the previous one's
    writing before it stages. Costs one CPU copy of the state for the manager's life.
    """

    _synchronize_after_execute = False

    def __init__(self) -> None:
        self.buffers: dict[str, Any] | None = None
        self.layout: dict[str, Any] | None = None

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        layout = {
            key: (tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else type(value)
            for key, value in _flatten(state_dict, "", {}).items()
        }
        if layout != self.layout:
            self.buffers, self.layout = _create_cpu_state_dict(state_dict), layout
        return _copy_state_dict(state_dict, self.buffers)

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass
