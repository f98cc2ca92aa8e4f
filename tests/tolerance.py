"""Error of a result against its fp64 reference, per element, in units of the reference at that
element and row, bounded by a small multiple of torch's own error at the dtype.

A bound relative to the global max of a tensor lets through a bug confined to where values are
small (a MoBA routed-block merge scaled by 0.8 moves late tokens' outputs, which are an order of
magnitude below the first tokens'); per element, with a floor tied to the row's own scale so
that near-zero elements do not demand impossible relative precision, it does not.

tests/conftest.py puts this folder on sys.path: `from tolerance import ...`.
"""

from __future__ import annotations

import torch

ROW_FLOOR = 0.1
"""Elements below this fraction of their row's largest magnitude are held to that fraction."""
MULTIPLE = 8.0
"""How much worse than torch's own error at the dtype an output may be."""


def relative_errors(x: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|x - exact| / (|exact| + ROW_FLOOR * max |exact row|), per element (rows along the last dim).
    A row that is exactly zero (the gradient of a query that attends only itself) takes the
    tensor's largest magnitude as its row's: a kernel's rounding leaves a few ulps there, which
    some CPUs' bf16 kernels do and others do not, and which is no error at the tensor's scale."""
    exact = exact.double()
    magnitude = exact.abs()
    row_max = magnitude.amax(-1, keepdim=True)
    row_max = torch.where(row_max > 0, row_max, magnitude.max())
    scale = magnitude + ROW_FLOOR * row_max
    return (x.double() - exact).abs() / scale.clamp_min(torch.finfo(torch.float64).tiny)


def allowed_error(dtype_result: torch.Tensor, exact: torch.Tensor, multiple: float = MULTIPLE) -> float:
    """`multiple` x the worst per-element error of torch's own computation at the dtype, and never
    under the dtype's rounding unit (an fp32 torch result can be nearly exact)."""
    unit = torch.finfo(dtype_result.dtype).eps / 2
    return multiple * max(relative_errors(dtype_result, exact).max().item(), unit)


def assert_within_dtype_error(name: str, got: torch.Tensor, exact: torch.Tensor, dtype_result: torch.Tensor) -> None:
    """`got` (any dtype) against `exact` (fp64), per element, within MULTIPLE x the error of
    `dtype_result`: the same function computed by torch at got's dtype."""
    assert got.shape == exact.shape and torch.isfinite(got).all(), name
    allowed = allowed_error(dtype_result, exact)
    errors = relative_errors(got, exact)
    worst = errors.max().item()
    if worst > allowed:
        where = tuple(int(i) for i in torch.unravel_index(errors.argmax(), errors.shape))
        raise AssertionError(
            f"{name}: per-element error {worst:.2e} at {where} (got {got[where].item():.4g}, exact "
            f"{exact[where].item():.4g}) exceeds {allowed:.2e} = {MULTIPLE:g} x torch's {got.dtype} error"
        )
