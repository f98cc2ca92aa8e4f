"""Grouped matrix multiply, the oracle: one matmul per group, in plain torch.

Shape legend: T rows (tokens, sorted so each group's rows are contiguous), D input width,
H output width, E groups (experts).
"""

from __future__ import annotations

import torch


def grouped_mm_reference(x_TD: torch.Tensor, w_EDH: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """y[s:e] = x[s:e] @ w[g] for group g spanning rows [offsets[g-1], offsets[g]).

    x_TD: [T, D]; w_EDH: [E, D, H]; offsets_E: [E] cumulative row ends (any integer dtype,
    non-decreasing, offsets[-1] <= T). Returns y_TH [T, H] in x's dtype. Rows past offsets[-1]
    belong to no group and come back as zeros. Differentiable in x and w; an empty group gets
    a zero weight gradient.
    """
    T = x_TD.shape[0]
    E, _, H = w_EDH.shape
    if offsets_E.shape != (E,):
        raise ValueError(f"offsets must have one entry per group ({E}), got shape {tuple(offsets_E.shape)}")
    ends = offsets_E.tolist()
    if any(b < a for a, b in zip([0] + ends[:-1], ends, strict=True)) or (ends and ends[-1] > T):
        raise ValueError(f"offsets must be non-decreasing, >= 0 and at most the {T} rows of x, got {ends}")
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
