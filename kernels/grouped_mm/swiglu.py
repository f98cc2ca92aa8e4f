"""Grouped SwiGLU experts with a written-out backward: y = (silu(x w1[g]) * (x w3[g])) w2[g] per group.

Shape legend: N rows (sorted so each group's rows are contiguous), D model width, H hidden
width, H2 = 2H (w13 = [w1 | w3] along its last dim), E groups (experts).

The backward is plain functions as well as the autograd Function's, split in two so that an
overlapped dispatcher can compute a chunk's input gradient at once (the next all-to-all waits
on it) and its weight gradients later:

    dx, dh13 = grouped_swiglu_backward_dx(dy, x, h13, w13, w2, offsets, backend)
    dw13, dw2 = grouped_swiglu_backward_dw(dy, x, h13, dh13, offsets, backend)

What is saved for backward is x (which autograd of two grouped_mm keeps too) and h13 = x w13,
2NH numbers; silu(h1) and the down projection's input a = silu(h1) * h3 are recomputed from it
(elementwise, no matmul). Autograd of the reference keeps h13, silu(h1) and a: 4NH. The price
is one more silu per element in the backward: on a CPU in bf16 (where silu is dear) the experts'
forward+backward measured 5-10% slower than autograd's (fp32: no slower); saving silu(h1) too
(3NH) would buy that back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .reference import group_ends

_torch_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_silu_backward = torch.ops.aten.silu_backward


def _check(x_ND: torch.Tensor, w13_EDH2: torch.Tensor, w2_EHD: torch.Tensor, offsets_E: torch.Tensor) -> None:
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


def _bounds(offsets_E: torch.Tensor, num_rows: int) -> list[tuple[int, int]]:
    ends = group_ends(offsets_E, offsets_E.shape[0], num_rows)
    return list(zip([0] + ends[:-1], ends, strict=True))


def _swiglu_grad(dA_nH: torch.Tensor, h13_nH2: torch.Tensor, dh13_nH2: torch.Tensor | None = None):
    """(d(h1 | h3), silu(h1)), d(h1 | h3) written into dh13_nH2 when given.

    The same elementwise ops, in the same dtype, as autograd of silu(h1) * h3, so a bf16
    gradient rounds as it did before. Without dh13_nH2 the halves are concatenated: torch.compile
    traces no `out=` into a strided view.
    """
    H = dA_nH.shape[1]
    h1_nH, h3_nH = h13_nH2[:, :H], h13_nH2[:, H:]
    silu_nH = F.silu(h1_nH)
    if dh13_nH2 is None:
        dh13_nH2 = torch.cat([_silu_backward(dA_nH * h3_nH, h1_nH), dA_nH * silu_nH], dim=1)
    else:
        _silu_backward.grad_input(dA_nH * h3_nH, h1_nH, grad_input=dh13_nH2[:, :H])
        torch.mul(dA_nH, silu_nH, out=dh13_nH2[:, H:])
    return dh13_nH2, silu_nH


# --- the per-group loop: any device and dtype, one pass per group, outputs written in place ---


def _loop_forward(x_ND, w13_EDH2, w2_EHD, bounds):
    N, H = x_ND.shape[0], w2_EHD.shape[1]
    y_ND = x_ND.new_empty(N, x_ND.shape[1])
    h13_NH2 = x_ND.new_empty(N, 2 * H)
    for g, (s, e) in enumerate(bounds):
        if e > s:
            torch.mm(x_ND[s:e], w13_EDH2[g], out=h13_NH2[s:e])
            torch.mm(F.silu(h13_NH2[s:e, :H]) * h13_NH2[s:e, H:], w2_EHD[g], out=y_ND[s:e])
    # Rows past the last group belong to none: zero, as the reference gives them.
    end = bounds[-1][1] if bounds else 0
    y_ND[end:] = 0
    h13_NH2[end:] = 0
    return y_ND, h13_NH2


def _dx_group(dy_nD, h13_nH2, w13_DH2, w2_HD, dx_nD, dh13_nH2) -> torch.Tensor:
    """One group's input gradient into dx_nD (and dh13_nH2); returns a = silu(h1) * h3."""
    _, silu_nH = _swiglu_grad(dy_nD @ w2_HD.T, h13_nH2, dh13_nH2)
    torch.mm(dh13_nH2, w13_DH2.T, out=dx_nD)
    return silu_nH * h13_nH2[:, w2_HD.shape[0] :]


def _dw_group(dy_nD, x_nD, dh13_nH2, a_nH, dw13_DH2, dw2_HD) -> None:
    torch.mm(x_nD.T, dh13_nH2, out=dw13_DH2)
    torch.mm(a_nH.T, dy_nD, out=dw2_HD)


def _loop_backward_dx(dy_ND, h13_NH2, w13_EDH2, w2_EHD, bounds):
    dx_ND = dy_ND.new_empty(dy_ND.shape[0], w13_EDH2.shape[1])
    dh13_NH2 = torch.empty_like(h13_NH2)
    for g, (s, e) in enumerate(bounds):
        if e > s:
            _dx_group(dy_ND[s:e], h13_NH2[s:e], w13_EDH2[g], w2_EHD[g], dx_ND[s:e], dh13_NH2[s:e])
    end = bounds[-1][1] if bounds else 0
    dx_ND[end:] = 0
    dh13_NH2[end:] = 0
    return dx_ND, dh13_NH2


def _empty_weight_grads(x_ND, E, H):
    D = x_ND.shape[1]
    return x_ND.new_empty(E, D, 2 * H), x_ND.new_empty(E, H, D)


def _loop_backward_dw(dy_ND, x_ND, h13_NH2, dh13_NH2, bounds):
    H = h13_NH2.shape[1] // 2
    dw13_EDH2, dw2_EHD = _empty_weight_grads(x_ND, len(bounds), H)
    for g, (s, e) in enumerate(bounds):
        a_nH = F.silu(h13_NH2[s:e, :H]) * h13_NH2[s:e, H:]
        _dw_group(dy_ND[s:e], x_ND[s:e], dh13_NH2[s:e], a_nH, dw13_EDH2[g], dw2_EHD[g])
    return dw13_EDH2, dw2_EHD


def _loop_backward(dy_ND, x_ND, h13_NH2, w13_EDH2, w2_EHD, bounds):
    """Both gradients in one pass per group, dh13 held for one group at a time."""
    N, H = x_ND.shape[0], w2_EHD.shape[1]
    dx_ND = x_ND.new_empty(N, x_ND.shape[1])
    dw13_EDH2, dw2_EHD = _empty_weight_grads(x_ND, len(bounds), H)
    scratch_nH2 = h13_NH2.new_empty(max((e - s for s, e in bounds), default=0), 2 * H)
    for g, (s, e) in enumerate(bounds):
        dh13_nH2 = scratch_nH2[: e - s]
        # An empty group still runs its (empty) products: they write its zero weight gradient.
        a_nH = _dx_group(dy_ND[s:e], h13_NH2[s:e], w13_EDH2[g], w2_EHD[g], dx_ND[s:e], dh13_nH2)
        _dw_group(dy_ND[s:e], x_ND[s:e], dh13_nH2, a_nH, dw13_EDH2[g], dw2_EHD[g])
    dx_ND[bounds[-1][1] if bounds else 0 :] = 0
    return dx_ND, dw13_EDH2, dw2_EHD


# --- torch's grouped_mm (a fused kernel on sm90 bf16): no host sync, rows past offsets[-1] unspecified ---


def _gmm(a, b, offsets_E):
    return _torch_grouped_mm(a, b, offs=offsets_E)


def _torch_forward(x_ND, w13_EDH2, w2_EHD, offsets_E):
    h13_NH2 = _gmm(x_ND, w13_EDH2, offsets_E)
    h1_NH, h3_NH = h13_NH2.chunk(2, dim=-1)
    return _gmm(F.silu(h1_NH) * h3_NH, w2_EHD, offsets_E), h13_NH2


def _torch_backward_dx(dy_ND, h13_NH2, w13_EDH2, w2_EHD, offsets_E):
    dh13_NH2, _ = _swiglu_grad(_gmm(dy_ND, w2_EHD.transpose(1, 2), offsets_E), h13_NH2)
    return _gmm(dh13_NH2, w13_EDH2.transpose(1, 2), offsets_E), dh13_NH2


def _torch_backward_dw(dy_ND, x_ND, h13_NH2, dh13_NH2, offsets_E):
    h1_NH, h3_NH = h13_NH2.chunk(2, dim=-1)
    # 2-d times 2-d with offsets along the summed dim: one [D, 2H] (or [H, D]) product per group.
    dw13_EDH2 = _gmm(x_ND.T, dh13_NH2, offsets_E)
    return dw13_EDH2, _gmm((F.silu(h1_NH) * h3_NH).T, dy_ND, offsets_E)


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


def grouped_swiglu_forward(x_ND, w13_EDH2, w2_EHD, offsets_E, backend: str = "loop"):
    """(y_ND, h13_NH2): the output and x w13, what the backward functions take. No autograd."""
    _check(x_ND, w13_EDH2, w2_EHD, offsets_E)
    if backend == "loop":
        return _loop_forward(x_ND, w13_EDH2, w2_EHD, _bounds(offsets_E, x_ND.shape[0]))
    return _torch_forward(x_ND, w13_EDH2, w2_EHD, offsets_E.to(torch.int32))


def grouped_swiglu_backward_dx(dy_ND, x_ND, h13_NH2, w13_EDH2, w2_EHD, offsets_E, backend: str = "loop"):
    """(dx_ND, dh13_NH2): the input gradient, and the gradient of h13 that the weight
    gradients take (`grouped_swiglu_backward_dw`). dy_ND may have any strides."""
    _check(x_ND, w13_EDH2, w2_EHD, offsets_E)
    dy_ND = dy_ND.contiguous()
    if backend == "loop":
        return _loop_backward_dx(dy_ND, h13_NH2, w13_EDH2, w2_EHD, _bounds(offsets_E, x_ND.shape[0]))
    return _torch_backward_dx(dy_ND, h13_NH2, w13_EDH2, w2_EHD, offsets_E.to(torch.int32))


def grouped_swiglu_backward_dw(dy_ND, x_ND, h13_NH2, dh13_NH2, offsets_E, backend: str = "loop"):
    """(dw13_EDH2, dw2_EHD): the weight gradients, zero for an empty group. Over chunks of
    rows (each with its own offsets), the chunks' results add up to the whole's."""
    dy_ND = dy_ND.contiguous()
    if backend == "loop":
        return _loop_backward_dw(dy_ND, x_ND, h13_NH2, dh13_NH2, _bounds(offsets_E, x_ND.shape[0]))
    return _torch_backward_dw(dy_ND, x_ND, h13_NH2, dh13_NH2, offsets_E.to(torch.int32))


def grouped_swiglu_backward(dy_ND, x_ND, h13_NH2, w13_EDH2, w2_EHD, offsets_E, backend: str = "loop"):
    """(dx_ND, dw13_EDH2, dw2_EHD). The loop computes all three in one pass per group."""
    if backend != "loop":
        dx_ND, dh13_NH2 = grouped_swiglu_backward_dx(dy_ND, x_ND, h13_NH2, w13_EDH2, w2_EHD, offsets_E, backend)
        return dx_ND, *grouped_swiglu_backward_dw(dy_ND, x_ND, h13_NH2, dh13_NH2, offsets_E, backend)
    _check(x_ND, w13_EDH2, w2_EHD, offsets_E)
    bounds = _bounds(offsets_E, x_ND.shape[0])
    return _loop_backward(dy_ND.contiguous(), x_ND, h13_NH2, w13_EDH2, w2_EHD, bounds)


class _GroupedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, w13_EDH2, w2_EHD, offsets_E, backend):
        y_ND, h13_NH2 = grouped_swiglu_forward(x_ND, w13_EDH2, w2_EHD, offsets_E, backend)
        ctx.save_for_backward(x_ND, w13_EDH2, w2_EHD, offsets_E, h13_NH2)
        ctx.backend = backend
        return y_ND

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_ND):
        x_ND, w13_EDH2, w2_EHD, offsets_E, h13_NH2 = ctx.saved_tensors
        grads = grouped_swiglu_backward(dy_ND, x_ND, h13_NH2, w13_EDH2, w2_EHD, offsets_E, ctx.backend)
        return *grads, None, None


# The loop's group sizes are data: traced, every new routing pattern would be a recompile.
_apply_eager = torch.compiler.disable(_GroupedSwiGLU.apply)


def grouped_swiglu(
    x_ND: torch.Tensor,
    w13_EDH2: torch.Tensor,
    w2_EHD: torch.Tensor,
    offsets_E: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """y[s:e] = (silu(x[s:e] w1[g]) * (x[s:e] w3[g])) w2[g] for each group g, whose rows are
    [offsets[g-1], offsets[g]); w13 = [w1 | w3] along its last dim.

    x_ND: [N, D] rows sorted by group; w13_EDH2: [E, D, 2H]; w2_EHD: [E, H, D]; offsets_E: [E]
    cumulative row ends, integer, non-decreasing, offsets[-1] <= N. Returns y_ND [N, D] in x's
    dtype (the autocast dtype inside autocast, like a matmul). Differentiable in x, w13 and w2,
    with the explicit backward above. Rows past offsets[-1] belong to no group: the loop gives
    zeros there (output and input gradient), torch's kernel leaves them unspecified, so keep
    offsets[-1] == N.

    backend: "loop", "grouped_mm" or "auto", as for `grouped_mm` (see `resolve_swiglu_backend`).
    """
    device_type = x_ND.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x_ND, w13_EDH2, w2_EHD = x_ND.to(dtype), w13_EDH2.to(dtype), w2_EHD.to(dtype)
    _check(x_ND, w13_EDH2, w2_EHD, offsets_E)
    backend = resolve_swiglu_backend(x_ND, w13_EDH2, w2_EHD, backend)
    # The operands are cast already; autocast inside would only re-check them.
    with torch.autocast(device_type, enabled=False):
        if backend == "loop":
            return _apply_eager(x_ND, w13_EDH2, w2_EHD, offsets_E, backend)
        return _GroupedSwiGLU.apply(x_ND, w13_EDH2, w2_EHD, offsets_E, backend)
