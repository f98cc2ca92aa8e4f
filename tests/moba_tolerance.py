"""MoBA as torch computes it under the dense selection mask: the "torch's own error at the dtype"
that tests/tolerance.py bounds MoBA's kernels by, and a merge bug to show the bound catches it.

Shape legend: T packed tokens, Hq/Hkv heads, D head dim, L tokens of one sequence, n its blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sparsetron.kernels.moba import moba_selection


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
