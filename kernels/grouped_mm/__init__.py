"""Grouped GEMM for stacked experts: each contiguous block of rows times its own weight matrix;
`grouped_swiglu` (swiglu.py) is the whole SwiGLU expert on it, with an explicit backward.

Shape legend: T rows (tokens sorted by group), D input width, H output width, E groups.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from .reference import grouped_mm_reference, grouped_swiglu_reference
from .swiglu import (
    grouped_swiglu,
    grouped_swiglu_backward,
    grouped_swiglu_backward_dw,
    grouped_swiglu_backward_dx,
    grouped_swiglu_forward,
    resolve_swiglu_backend,
)

__all__ = [
    "grouped_mm",
    "grouped_mm_reference",
    "grouped_swiglu",
    "grouped_swiglu_backward",
    "grouped_swiglu_backward_dw",
    "grouped_swiglu_backward_dx",
    "grouped_swiglu_forward",
    "grouped_swiglu_reference",
    "resolve_backend",
    "resolve_swiglu_backend",
]

Backend = Literal["auto", "grouped_mm", "loop"]

# The public name arrived after the private op (torch 2.8 has only torch._grouped_mm).
_torch_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient.

    torch's grouped_mm backward rejects gradients with zero strides (what `y.sum()` or a
    broadcast produces), at least on the CPU; materialising them costs one copy.
    """

    @staticmethod
    def forward(ctx, y):
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


# The loop's group sizes are data: traced, every new routing pattern would be a recompile.
_loop = torch.compiler.disable(grouped_mm_reference)


def _aligned(t: torch.Tensor) -> bool:
    # The torch kernel needs every stride to be a multiple of 16 bytes.
    return all((s * t.element_size()) % 16 == 0 for s in t.stride()[:-1]) and t.stride(-1) == 1


def resolve_backend(x_TD: torch.Tensor, w_EDH: torch.Tensor, backend: Backend = "auto") -> str:
    """The backend `grouped_mm` will use for these inputs: "grouped_mm" or "loop".

    auto takes torch's grouped_mm only where it is a real fused kernel: CUDA, compute
    capability >= 9.0, bf16, 16-byte aligned strides. Everywhere else the per-expert loop is
    both faster and fully differentiable.
    """
    if backend in ("grouped_mm", "loop"):
        return backend
    if backend != "auto":
        raise ValueError(f"grouped_mm backend must be 'auto', 'grouped_mm' or 'loop', got {backend!r}")
    if (
        _torch_grouped_mm is not None
        and x_TD.is_cuda
        and torch.cuda.get_device_capability(x_TD.device) >= (9, 0)
        and x_TD.dtype == torch.bfloat16
        and w_EDH.dtype == torch.bfloat16
        and _aligned(x_TD)
        and _aligned(w_EDH)
    ):
        return "grouped_mm"
    return "loop"


def grouped_mm(
    x_TD: torch.Tensor, w_EDH: torch.Tensor, offsets_E: torch.Tensor, backend: Backend = "auto"
) -> torch.Tensor:
    """y[s:e] = x[s:e] @ w[g] for each group g, whose rows are [offsets[g-1], offsets[g]).

    x_TD: [T, D] rows sorted by group; w_EDH: [E, D, H] (row-major per group, x @ w[g]);
    offsets_E: [E] cumulative row ends, integer, non-decreasing, offsets[-1] <= T.
    Returns y_TH [T, H] in x's dtype (the autocast dtype inside autocast). Rows past
    offsets[-1] belong to no group: the loop gives zeros there, torch's kernel leaves them
    unspecified, so keep offsets[-1] == T.

    backend: "loop" (one matmul per group, any device and dtype), "grouped_mm"
    (torch.nn.functional.grouped_mm, fp32/bf16/fp16 with 16-byte aligned strides), or "auto"
    (see `resolve_backend`).
    """
    if x_TD.dim() != 2 or w_EDH.dim() != 3 or x_TD.shape[1] != w_EDH.shape[1]:
        raise ValueError(f"expected x [T, D] and w [E, D, H], got {tuple(x_TD.shape)} and {tuple(w_EDH.shape)}")
    device_type = x_TD.device.type
    if torch.is_autocast_enabled(device_type):
        # Behave like a matmul under autocast; casting first also lets auto see bf16 operands
        # when the model keeps fp32 weights.
        dtype = torch.get_autocast_dtype(device_type)
        x_TD, w_EDH = x_TD.to(dtype), w_EDH.to(dtype)
    if resolve_backend(x_TD, w_EDH, backend) == "loop":
        return _loop(x_TD, w_EDH, offsets_E)
    if _torch_grouped_mm is None:
        raise RuntimeError(f"torch {torch.__version__} has no grouped_mm; use backend='loop'")
    y_TH = _torch_grouped_mm(x_TD, w_EDH, offs=offsets_E.to(torch.int32))
    return _ContiguousGrad.apply(y_TH)
