"""Initialise a parallelized model exactly as one process would.

`init_weights()` draws from torch's global random stream in a fixed order. Under
`SingleProcessInit`, every in-place init op whose target is sharded (a DTensor) draws the
full tensor from that stream and keeps this rank's shard; a target still on the meta
device (a piece another pipeline stage owns) draws the full tensor and drops it, so the
stream advances as in one process. Plain tensors are untouched. The result is bitwise
equal to a single-process init on every layout, for one full tensor of memory at a time.
DTensor's own random ops are no substitute: they do not support CPU meshes and do not
reproduce single-device values.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.overrides import TorchFunctionMode

# Names of in-place init ops, as Tensor methods and as torch.nn.init functions.
INIT_OPS = frozenset(
    {"normal_", "uniform_", "trunc_normal_", "ones_", "zeros_", "constant_", "fill_", "zero_"}
    | {"xavier_normal_", "xavier_uniform_", "kaiming_normal_", "kaiming_uniform_"}
)


class SingleProcessInit(TorchFunctionMode):
    """Context manager: `with SingleProcessInit(device): model.init_weights()`.

    `device` is where the model was materialised, the device whose random generator one
    process would draw from; pieces still on the meta device draw there too.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        super().__init__()
        self.device = torch.device(device)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # torch.nn.init functions receive their tensor as a keyword, Tensor methods as self.
        target = args[0] if args else kwargs.get("tensor")
        sharded = isinstance(target, DTensor)
        if getattr(func, "__name__", "") not in INIT_OPS or not (sharded or getattr(target, "is_meta", False)):
            return func(*args, **kwargs)
        # A DTensor may itself be a meta piece (expert or tensor shards of another stage's layer).
        meta = target.to_local().is_meta if sharded else True
        full = torch.empty(target.shape, dtype=target.dtype, device=self.device)
        if args:
            args = (full, *args[1:])
        else:
            kwargs = {**kwargs, "tensor": full}
        with torch.no_grad():
            func(*args, **kwargs)
            if sharded and not meta:
                # src_data_rank=None: every rank holds `full` already, so this only slices.
                shard = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
                target.to_local().copy_(shard.to_local())
        return target
