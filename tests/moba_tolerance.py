"""Error of a MoBA output or gradient against its fp64 reference, per element, in units of the
reference at that element and row, bounded by a small multiple of torch's own error at the dtype.

A bound relative to the global max of a tensor lets through a bug confined to where values are
small (a routed-block merge scaled by 0.8 moves late tokens' outputs, which are an order of
magnitude below the first tokens'); per element, with a floor tied to the row's own scale so
that near-zero elements do not demand impossible relative precision, it does not.

Shape legend: T packed tokens, Hq/Hkv heads, D head dim, L tokens of one sequence, n its blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sparsetron.kernels.moba import moba_selection

ROW_FLOOR = 0.1
"""Elements below this fraction of their row's largest magnitude are held to that fraction."""
MULTIPLE = 8.0
"""How much worse than torch's own error at the dtype an output may be."""


def relative_errors(x: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|x - exact| / (|exact| + ROW_FLOOR * max |exact row|), per element (rows along the last dim)."""
    exact = exact.double()
    scale = exact.abs() + ROW_FLOOR * exact.abs().amax(-1, keepdim=True)
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


def masked_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    block_size: int,
    topk: int,
    routed_weight: float = 1.0,
) -> torch.Tensor:
    """MoBA as torch's scaled_dot_product_attention under the dense selection mask, in the inputs'
    dtype: q [T, Hq, D], k and v [T, Hkv, D] -> o [T, Hq, D]. `routed_weight` != 1 multiplies the
    attention weight of the routed (fully past) blocks before normalization: a merge bug."""
    groups = q.shape[1] // k.shape[1]
    outputs = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end == start:
            continue
        q_LHD, k_LHD, v_LHD = q[start:end], k[start:end], v[start:end]
        k_LHD, v_LHD = k_LHD.repeat_interleave(groups, 1), v_LHD.repeat_interleave(groups, 1)
        L = end - start
        chosen_HLn = moba_selection(q_LHD.detach(), k_LHD.detach(), block_size, topk)
        block_L = torch.arange(L, device=q.device) // block_size
        causal_LL = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        mask_HLL = chosen_HLn[:, :, block_L] & causal_LL
        if routed_weight != 1.0:
            current_LL = block_L.view(L, 1) == block_L.view(1, L)
            bias_HLL = torch.where(current_LL, 0.0, math.log(routed_weight)).to(q.dtype).expand_as(mask_HLL)
            mask_HLL = bias_HLL.masked_fill(~mask_HLL, float("-inf"))
        # 4-D, so that CUDA picks a fused kernel (as it would for a model) rather than the math path.
        q_1HLD, k_1HLD, v_1HLD = (x.transpose(0, 1).unsqueeze(0) for x in (q_LHD, k_LHD, v_LHD))
        o_1HLD = F.scaled_dot_product_attention(q_1HLD, k_1HLD, v_1HLD, attn_mask=mask_HLL.unsqueeze(0))
        outputs.append(o_1HLD[0].transpose(0, 1))
    return torch.cat(outputs)
