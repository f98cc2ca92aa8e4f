"""Grouped SwiGLU experts with a written-out backward: y = (silu(x w1[g]) * (x w3[g])) w2[g] per group.

Shape legend: N rows (sorted so each group's rows are contiguous), D model width, H hidden
width, H2 = 2H (w13 = [w1 | w3] along its last dim), E groups (experts).

The backward is plain functions as well as the autograd Function's, split in two so that an
overlapped dispatcher can compute a chunk's input gradient at once (the next all-to-all waits
on it) and its weight gradients later:

    dx, dh13, dscale = grouped_swiglu_backward_dx(dy, x, h13, w13, w2, offsets, backend, scale)
    dw13, dw2 = grouped_swiglu_backward_dw(dy, x, h13, dh13, offsets, backend, scale)

An optional per-row scale (the routing weights) multiplies the hidden activation before the
down projection, so the experts return their rows already weighted.

Each function is grouped products (`_grouped_rows`, `_grouped_weights`: one matmul per group
with the loop, or torch's grouped_mm) with the SwiGLU's elementwise math between them, on whole
tensors, in fp32 (or wider) and rounded once to the rows' dtype: on a CPU, per-group
elementwise ops cost more in Python than in arithmetic at fine granularity, and 16-bit ops on
the strided halves of h13 measured 3x slower than an fp32 copy and fp32 ops.

What is saved for backward is x (which autograd of two grouped_mm keeps too) and h13 = x w13,
2NH numbers; silu(h1) and the down projection's input a = silu(h1) * h3 are recomputed from it
(elementwise, no matmul). Autograd of the reference keeps h13, silu(h1) and a: 4NH.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .reference import group_ends

_torch_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_silu_backward = torch.ops.aten.silu_backward


def _check(
    x_ND: torch.Tensor, w13_EDH2: torch.Tensor, w2_EHD: torch.Tensor, offsets_E: torch.Tensor, scale_N=None
) -> None:
    shapes = f"x {tuple(x_ND.shape)}, w13 {tuple(w13_EDH2.shape)}, w2 {tuple(w2_EHD.shape)}"
    if x_ND.dim() != 2 or w13_EDH2.dim() != 3 or w2_EHD.dim() != 3:
        raise ValueError(f"grouped_swiglu expects x [N, D], w13 [E, D, 2H], w2 [E, H, D], got {shapes}")
    E, D, H2 = w13_EDH2.shape
    if x_ND.shape[1] != D or H2 % 2 or w2_EHD.shape != (E, H2 // 2, D):
        raise ValueError(f"grouped_swiglu expects x [N, D], w13 [E, D, 2H], w2 [E, H, D], got {shapes}")
    if offsets_E.shape != (E,):
        raise ValueError(f"offsets must have one entry per group ({E}), got shape {tuple(offsets_E.shape)}")
    if not (x_ND.dtype == w13_EDH2.dtype == w2_EHD.dtype):
        raise ValueError(
            f"x, w13 and w2 must share a dtype, got {x_ND.dtype}, {w13_EDH2.dtype} and {w2_EHD.dtype} (or use autocast)"
        )
    if scale_N is not None and (scale_N.shape != x_ND.shape[:1] or not scale_N.is_floating_point()):
        raise ValueError(
            f"scale must be floating, one per row of x ({x_ND.shape[0]}), got {scale_N.dtype} {tuple(scale_N.shape)}"
        )


def _wide(h13_NH2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h1, h3) in fp32 (or wider): h13 itself in fp32 (never write into these), an fp32 copy of
    a 16-bit h13. The SwiGLU's elementwise math runs on these and rounds once at its end: on a
    CPU, 16-bit elementwise ops on the strided halves of h13 measured 3x slower than the copy
    and the fp32 ops together, and each would round on its own."""
    wide_NH2 = h13_NH2.to(torch.promote_types(h13_NH2.dtype, torch.float32))
    H = h13_NH2.shape[1] // 2
    return wide_NH2[:, :H], wide_NH2[:, H:]


def _down_input(h13_NH2: torch.Tensor, scale_N: torch.Tensor | None) -> torch.Tensor:
    """The down projection's input a = silu(h1) * h3, times scale per row when given, computed
    in fp32 (or wider) and rounded once to h13's dtype."""
    h1_NH, h3_NH = _wide(h13_NH2)
    a_NH = F.silu(h1_NH).mul_(h3_NH)
    if scale_N is not None:
        a_NH.mul_(scale_N.unsqueeze(1))
    return a_NH.to(h13_NH2.dtype)


def _hidden_grad(dAs_NH: torch.Tensor, h13_NH2: torch.Tensor, scale_N: torch.Tensor | None):
    """(d h13, d scale or None, a) from dAs = d(a * scale), the gradient of the down projection's
    input (a fresh tensor, overwritten here): d h13 and the down projection's input a (scaled)
    in h13's dtype, d scale in the scale's. The math runs in fp32 (or wider) and rounds once,
    each half of d h13 written straight into it (no concatenation, no second copy)."""
    h1_NH, h3_NH = _wide(h13_NH2)
    dA_NH = dAs_NH.to(h1_NH.dtype)
    silu_NH = F.silu(h1_NH)
    a_NH = silu_NH * h3_NH
    dscale_N = None
    if scale_N is not None:
        # d scale: the row-wise dot of d(a * scale) with the unscaled a.
        dscale_N = torch.linalg.vecdot(dA_NH, a_NH).to(scale_N.dtype)
        dA_NH.mul_(scale_N.unsqueeze(1))
        a_NH.mul_(scale_N.unsqueeze(1))
    H = h1_NH.shape[1]
    dh13_NH2 = torch.empty_like(h13_NH2)
    dh13_NH2[:, H:].copy_(silu_NH.mul_(dA_NH))
    dh13_NH2[:, :H].copy_(_silu_backward(dA_NH.mul_(h3_NH), h1_NH))
    return dh13_NH2, dscale_N, a_NH.to(h13_NH2.dtype)


# --- the grouped products: the per-group loop (any device and dtype) or torch's grouped_mm ---
# Groups are a list of (start, end) rows for the loop, the int32 row ends for grouped_mm.


def _groups(offsets_E: torch.Tensor, num_rows: int, backend: str):
    if backend == "loop":
        ends = group_ends(offsets_E, offsets_E.shape[0], num_rows)
        return list(zip([0] + ends[:-1], ends, strict=True))
    return offsets_E.to(torch.int32)


def _grouped_rows(a_NK: torch.Tensor, b_EKM: torch.Tensor, groups, backend: str) -> torch.Tensor:
    """[N, M]: a[s:e] @ b[g] for each group g of rows [s, e). Rows past the last group: zero from
    the loop, unspecified from torch's kernel."""
    if backend != "loop":
        return _torch_grouped_mm(a_NK, b_EKM, offs=groups)
    out_NM = a_NK.new_empty(a_NK.shape[0], b_EKM.shape[2])
    for g, (s, e) in enumerate(groups):
        if e > s:
            torch.mm(a_NK[s:e], b_EKM[g], out=out_NM[s:e])
    out_NM[groups[-1][1] if groups else 0 :] = 0
    return out_NM


def _grouped_weights(a_NK: torch.Tensor, b_NM: torch.Tensor, groups, backend: str) -> torch.Tensor:
    """[E, K, M]: a[s:e].T @ b[s:e] for each group g of rows [s, e): zero for an empty group."""
    if backend != "loop":
        # 2-d times 2-d with offsets along the summed dim: one [K, M] product per group.
        return _torch_grouped_mm(a_NK.T, b_NM, offs=groups)
    out_EKM = a_NK.new_empty(len(groups), a_NK.shape[1], b_NM.shape[1])
    for g, (s, e) in enumerate(groups):
        # An empty group still runs its (empty) product: it writes the zero gradient.
        torch.mm(a_NK[s:e].T, b_NM[s:e], out=out_EKM[g])
    return out_EKM


def _backward_dx(dy_ND, h13_NH2, w13_EDH2, w2_EHD, groups, backend, scale_N):
    """(dx, dh13, dscale, a): `grouped_swiglu_backward_dx` and the down projection's input."""
    dAs_NH = _grouped_rows(dy_ND, w2_EHD.transpose(1, 2), groups, backend)
    dh13_NH2, dscale_N, a_NH = _hidden_grad(dAs_NH, h13_NH2, scale_N)
    return _grouped_rows(dh13_NH2, w13_EDH2.transpose(1, 2), groups, backend), dh13_NH2, dscale_N, a_NH


def _backward_dw(dy_ND, x_ND, dh13_NH2, a_NH, groups, backend):
    return _grouped_weights(x_ND, dh13_NH2, groups, backend), _grouped_weights(a_NH, dy_ND, groups, backend)


# --- the public functions ---


def resolve_swiglu_backend(x_ND: torch.Tensor, w13_EDH2: torch.Tensor, w2_EHD: torch.Tensor, backend: str) -> str:
    """ "loop" or "grouped_mm": `grouped_mm.resolve_backend` for both products; auto also needs
    the hidden activations [N, H] 16-byte aligned, as the down projection reads them."""
    from . import resolve_backend

    chosen = resolve_backend(x_ND, w13_EDH2, backend)
    if backend == "auto" and chosen == "grouped_mm":
        hidden_aligned = (w2_EHD.shape[1] * x_ND.element_size()) % 16 == 0
        if not (hidden_aligned and resolve_backend(x_ND, w2_EHD, "auto") == "grouped_mm"):
            return "loop"
    if chosen == "grouped_mm" and _torch_grouped_mm is None:
        raise RuntimeError(f"torch {torch.__version__} has no grouped_mm; use backend='loop'")
    return chosen


def grouped_swiglu_forward(x_ND, w13_EDH2, w2_EHD, offsets_E, backend: str = "loop", scale_N=None):
    """(y_ND, h13_NH2): the output and x w13, what the backward functions take. No autograd.
    scale_N: see `grouped_swiglu`; pass the same to the backward functions."""
    _check(x_ND, w13_EDH2, w2_EHD, offsets_E, scale_N)
    groups = _groups(offsets_E, x_ND.shape[0], backend)
    h13_NH2 = _grouped_rows(x_ND, w13_EDH2, groups, backend)
    return _grouped_rows(_down_input(h13_NH2, scale_N), w2_EHD, groups, backend), h13_NH2


def grouped_swiglu_backward_dx(dy_ND, x_ND, h13_NH2, w13_EDH2, w2_EHD, offsets_E, backend: str = "loop", scale_N=None):
    """(dx_ND, dh13_NH2, dscale_N): the input gradient, the gradient of h13 that the weight
    gradients take (`grouped_swiglu_backward_dw`), and the scale's gradient (None without a
    scale; zero past the groups' rows with the loop). dy_ND may have any strides."""
    _check(x_ND, w13_EDH2, w2_EHD, offsets_E, scale_N)
    groups = _groups(offsets_E, x_ND.shape[0], backend)
    return _backward_dx(dy_ND.contiguous(), h13_NH2, w13_EDH2, w2_EHD, groups, backend, scale_N)[:3]


def grouped_swiglu_backward_dw(dy_ND, x_ND, h13_NH2, dh13_NH2, offsets_E, backend: str = "loop", scale_N=None):
    """(dw13_EDH2, dw2_EHD): the weight gradients, zero for an empty group. Over chunks of
    rows (each with its own offsets), the chunks' results add up to the whole's."""
    groups = _groups(offsets_E, x_ND.shape[0], backend)
    return _backward_dw(dy_ND.contiguous(), x_ND, dh13_NH2, _down_input(h13_NH2, scale_N), groups, backend)


def grouped_swiglu_backward(dy_ND, x_ND, h13_NH2, w13_EDH2, w2_EHD, offsets_E, backend: str = "loop", scale_N=None):
    """(dx_ND, dw13_EDH2, dw2_EHD, dscale_N): `grouped_swiglu_backward_dx` then `_dw`, computing
    the down projection's input once."""
    _check(x_ND, w13_EDH2, w2_EHD, offsets_E, scale_N)
    groups = _groups(offsets_E, x_ND.shape[0], backend)
    dy_ND = dy_ND.contiguous()
    dx_ND, dh13_NH2, dscale_N, a_NH = _backward_dx(dy_ND, h13_NH2, w13_EDH2, w2_EHD, groups, backend, scale_N)
    return dx_ND, *_backward_dw(dy_ND, x_ND, dh13_NH2, a_NH, groups, backend), dscale_N


class _GroupedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, w13_EDH2, w2_EHD, offsets_E, backend, scale_N):
        y_ND, h13_NH2 = grouped_swiglu_forward(x_ND, w13_EDH2, w2_EHD, offsets_E, backend, scale_N)
        ctx.save_for_backward(x_ND, w13_EDH2, w2_EHD, offsets_E, h13_NH2, scale_N)
        ctx.backend = backend
        return y_ND

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_ND):
        x_ND, w13_EDH2, w2_EHD, offsets_E, h13_NH2, scale_N = ctx.saved_tensors
        dx, dw13, dw2, dscale = grouped_swiglu_backward(
            dy_ND, x_ND, h13_NH2, w13_EDH2, w2_EHD, offsets_E, ctx.backend, scale_N
        )
        return dx, dw13, dw2, None, None, dscale


# The loop's group sizes are data: traced, every new routing pattern would be a recompile.
_apply_eager = torch.compiler.disable(_GroupedSwiGLU.apply)


def grouped_swiglu(
    x_ND: torch.Tensor,
    w13_EDH2: torch.Tensor,
    w2_EHD: torch.Tensor,
    offsets_E: torch.Tensor,
    backend: str = "auto",
    scale_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[s:e] = ((silu(x[s:e] w1[g]) * (x[s:e] w3[g])) * scale[s:e]) w2[g] for each group g,
    whose rows are [offsets[g-1], offsets[g]); w13 = [w1 | w3] along its last dim.

    x_ND: [N, D] rows sorted by group; w13_EDH2: [E, D, 2H]; w2_EHD: [E, H, D]; offsets_E: [E]
    cumulative row ends, integer, non-decreasing, offsets[-1] <= N; scale_N: [N] per-row
    factors (the routing weights), floating, kept in their own dtype (fp32 under bf16: the
    hidden activation is scaled in fp32 and rounded once), or None for 1. Returns y_ND [N, D]
    in x's dtype (the autocast dtype inside autocast, like a matmul). Differentiable in x,
    w13, w2 and scale_N, with the explicit backward above. Rows past offsets[-1] belong to no
    group: the loop gives zeros there (output and gradients), torch's kernel leaves them
    unspecified, so keep offsets[-1] == N.

    Scaling the hidden activation [N, H] rather than the output [N, D] is the same function
    with H / D as many numbers to scale and to take the scale's gradient over (1/8 to 1/32 for
    fine-grained experts), and leaves the output an unweighted sum to combine.

    backend: "loop", "grouped_mm" or "auto", as for `grouped_mm` (see `resolve_swiglu_backend`).
    """
    device_type = x_ND.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x_ND, w13_EDH2, w2_EHD = x_ND.to(dtype), w13_EDH2.to(dtype), w2_EHD.to(dtype)
    _check(x_ND, w13_EDH2, w2_EHD, offsets_E, scale_N)
    backend = resolve_swiglu_backend(x_ND, w13_EDH2, w2_EHD, backend)
    # The operands are cast already; autocast inside would only re-check them.
    with torch.autocast(device_type, enabled=False):
        if backend == "loop":
            return _apply_eager(x_ND, w13_EDH2, w2_EHD, offsets_E, backend, scale_N)
        return _GroupedSwiGLU.apply(x_ND, w13_EDH2, w2_EHD, offsets_E, backend, scale_N)
