"""What a weight is as the forward computes with it, under the one precision policy."""

from __future__ import annotations

import torch


def as_computed(weight: torch.Tensor) -> torch.Tensor:
    """`weight` as the forward computes with it: rounded to the autocast dtype under autocast, as
    FSDP's mixed precision gathers every parameter, else unchanged. Norms and routers then up-cast
    it and do their math in fp32, so they compute the same on every layout (parallel/precision.py)."""
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        return weight.to(torch.get_autocast_dtype(device_type))
    return weight
