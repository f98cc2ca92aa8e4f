"""Small collective helpers shared by the parallel layers and the trainer."""

from __future__ import annotations

import torch
import torch.distributed as dist


def sum_over(group: dist.ProcessGroup):
    """A function that returns its tensor summed over `group` (an all-reduce SUM on a copy).

    The MoE layers take such a function (balancing.Reducer) for their expert counts; a copy,
    so that the caller's tensor is left as it was.
    """

    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
        return tensor

    return reduce
