"""Grouped matrix multiply and grouped SwiGLU, the oracles: one matmul per group, in plain torch.

Shape legend: T (or N) rows (tokens, sorted so each group's rows are contiguous), D input width,
H output width (the SwiGLU's hidden width), E groups (experts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def group_ends(offsets_E: torch.Tensor, num_groups: int, num_rows: int) -> list[int]:
    """offsets as a list of row ends (one host sync), checked: one per group, non-decreasing,
    >= 0 and at most `num_rows`."""
    if offsets_E.shape != (num_groups,):
        raise ValueError(f"offsets must have one entry per group ({num_groups}), got shape {tuple(offsets_E.shape)}")
    ends = offsets_E.tolist()
    if any(b < a for a, b in zip([0] + ends[:-1], ends, strict=True)) or (ends and ends[-1] > num_rows):
        raise ValueError(f"offsets must be non-decreasing, >= 0 and at most the {num_rows} rows of x, got {ends}")
    return ends


def grouped_mm_reference(x_TD: torch.Tensor, w_EDH: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """y[s:e] = x[s:e] @ w[g] for group g spanning rows [offsets[g-1], offsets[g]).

    x_TD: [T, D]; w_EDH: [E, D, H]; offsets_E: [E] cumulative row ends (any integer dtype,
    non-decreasing, offsets[-1] <= T). Returns y_TH [T, H] in x's dtype. Rows past offsets[-1]
    belong to no group and come back as zeros. Differentiable in x and w; an empty group gets
    a zero weight gradient.
    """
    T = x_TD.shape[0]
    E, _, H = w_EDH.shape
    ends = group_ends(offsets_E, E, T)
    # split/unbind rather than slicing and indexing: their backward concatenates the pieces'
    # gradients, where a slice's or select's backward zero-fills a full-size tensor per group.
    sizes = [b - a for a, b in zip([0] + ends[:-1], ends, strict=True)]
    x_pieces = torch.split(x_TD, [*sizes, T - sum(sizes)], dim=0)
    # Empty groups still run a [0, D] @ [D, H] product, so every w[g] is in the graph and
    # receives a (zero) gradient rather than None.
    pieces = [x_g @ w_g for x_g, w_g in zip(x_pieces, w_EDH.unbind(0), strict=False)]
    if sum(sizes) < T:
        pieces.append(x_TD.new_zeros(T - sum(sizes), H))
    if not pieces:
        return x_TD.new_zeros(T, H)
    return torch.cat(pieces, dim=0)


def grouped_swiglu_reference(
    x_ND: torch.Tensor,
    w13_EDH2: torch.Tensor,
    w2_EHD: torch.Tensor,
    offsets_E: torch.Tensor,
    scale_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[s:e] = ((silu(x[s:e] w1[g]) * (x[s:e] w3[g])) * scale[s:e]) w2[g] for group g,
    w13 = [w1 | w3] along its last dim: the SwiGLU experts as two grouped products,
    differentiated by autograd.

    x_ND: [N, D]; w13_EDH2: [E, D, 2H]; w2_EHD: [E, H, D]; offsets_E as in grouped_mm_reference;
    scale_N: [N] per-row factors or None. Rows past offsets[-1] come back as zeros.
    """
    h1_NH, h3_NH = grouped_mm_reference(x_ND, w13_EDH2, offsets_E).chunk(2, dim=-1)
    a_NH = F.silu(h1_NH) * h3_NH
    if scale_N is not None:
        a_NH = (a_NH * scale_N.unsqueeze(-1)).to(a_NH.dtype)
    return grouped_mm_reference(a_NH, w2_EHD, offsets_E)
