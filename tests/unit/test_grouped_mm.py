"""grouped_mm: the loop reference and torch's kernel against an fp64 per-row computation.

Shape legend: T rows, D input width, H output width, E groups.
"""

from __future__ import annotations

import pytest
import torch

from sparsetron.kernels.grouped_mm import grouped_mm, grouped_mm_reference, resolve_backend


def _offsets(counts):
    return torch.tensor(counts).cumsum(0).to(torch.int32)


def _per_row(x_TD, w_EDH, offsets_E):
    """Each row times its group's matrix, one batched product (another code path than the loop);
    rows past offsets[-1] are zero."""
    T = x_TD.shape[0]
    group_T = torch.searchsorted(offsets_E.long(), torch.arange(T), right=True)
    inside_T = group_T < w_EDH.shape[0]
    w_TDH = w_EDH[group_T.clamp_max(w_EDH.shape[0] - 1)]
    y_TH = torch.bmm(x_TD.unsqueeze(1), w_TDH).squeeze(1)
    return y_TH * inside_T.unsqueeze(1).to(y_TH.dtype)


def _run(fn, x, w, offsets, grad_out):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    y = fn(x, w, offsets)
    y.backward(grad_out.to(y.dtype))
    return y.detach(), x.grad, w.grad


def _check_against_fp64(fn, dtype, x, w, offsets, check_grads=True):
    """fn at `dtype` may be off from fp64 by a few times what torch's own batched product at
    that dtype is off, plus one rounding of the largest value."""
    g = torch.randn(x.shape[0], w.shape[2], dtype=torch.float64)
    ref = _run(_per_row, x.double(), w.double(), offsets, g)
    torch_own = _run(_per_row, x.to(dtype), w.to(dtype), offsets, g)
    ours = _run(fn, x.to(dtype), w.to(dtype), offsets, g)
    names = ("y", "dx", "dw") if check_grads else ("y",)
    for name, o, t, r in zip(names, ours, torch_own, ref, strict=False):
        assert o.dtype == dtype, name
        baseline = (t.double() - r).abs().max().item()
        tol = 4 * baseline + torch.finfo(dtype).eps * r.abs().max().item()
        err = (o.double() - r).abs().max().item()
        assert err <= tol, f"{name}: error {err:.3g} > tolerance {tol:.3g} at {dtype}"


ODD = [(37, 13, 11, [5, 0, 12, 0, 20, 0]), (29, 7, 19, [0, 29, 0]), (5, 3, 2, [0, 0, 0, 5])]


@pytest.mark.parametrize("T,D,H,counts", ODD)
def test_reference_forward_and_grads_fp32(T, D, H, counts):
    torch.manual_seed(0)
    x, w = torch.randn(T, D), torch.randn(len(counts), D, H)
    _check_against_fp64(grouped_mm_reference, torch.float32, x, w, _offsets(counts))


def test_reference_empty_group_gets_zero_weight_grad_and_tail_rows_are_zero():
    torch.manual_seed(1)
    x = torch.randn(10, 6, requires_grad=True)
    w = torch.randn(3, 6, 4, requires_grad=True)
    y = grouped_mm_reference(x, w, _offsets([3, 0, 5]))  # rows 8 and 9 belong to no group
    y.backward(torch.randn_like(y))
    assert torch.equal(y[8:], torch.zeros(2, 4))
    assert torch.equal(w.grad[1], torch.zeros(6, 4))
    assert w.grad[0].abs().sum() > 0 and w.grad[2].abs().sum() > 0
    assert torch.equal(x.grad[8:], torch.zeros(2, 6))


def test_reference_rejects_bad_offsets():
    x, w = torch.randn(6, 4), torch.randn(3, 4, 2)
    with pytest.raises(ValueError, match="non-decreasing"):
        grouped_mm_reference(x, w, torch.tensor([4, 2, 6]))
    with pytest.raises(ValueError, match="non-decreasing"):
        grouped_mm_reference(x, w, torch.tensor([1, 2, 7]))
    with pytest.raises(ValueError, match="one entry per group"):
        grouped_mm_reference(x, w, torch.tensor([1, 6]))


def test_auto_takes_the_loop_on_cpu():
    x, w = torch.randn(8, 16, dtype=torch.bfloat16), torch.randn(2, 16, 8, dtype=torch.bfloat16)
    assert resolve_backend(x, w, "auto") == "loop"
    assert resolve_backend(x, w, "grouped_mm") == "grouped_mm"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend(x, w, "cutlass")


def test_public_loop_backend_is_the_reference():
    torch.manual_seed(2)
    x, w, off = torch.randn(21, 5), torch.randn(4, 5, 3), _offsets([6, 0, 7, 8])
    assert torch.equal(grouped_mm(x, w, off, backend="loop"), grouped_mm_reference(x, w, off))


# torch's kernel needs 16-byte aligned strides: D and H multiples of 4 (fp32) or 8 (bf16).
ALIGNED = [(37, 16, 24, [5, 0, 12, 0, 20]), (19, 8, 16, [0, 19, 0])]


@pytest.mark.parametrize("T,D,H,counts", ALIGNED)
def test_torch_backend_fp32_forward_and_grads(T, D, H, counts):
    torch.manual_seed(3)
    x, w = torch.randn(T, D), torch.randn(len(counts), D, H)
    fn = lambda x, w, o: grouped_mm(x, w, o, backend="grouped_mm")  # noqa: E731
    _check_against_fp64(fn, torch.float32, x, w, _offsets(counts))


@pytest.mark.parametrize("T,D,H,counts", ALIGNED)
def test_torch_backend_bf16_forward(T, D, H, counts):
    torch.manual_seed(4)
    x, w = torch.randn(T, D), torch.randn(len(counts), D, H)
    fn = lambda x, w, o: grouped_mm(x, w, o, backend="grouped_mm")  # noqa: E731
    _check_against_fp64(fn, torch.bfloat16, x, w, _offsets(counts), check_grads=False)


def test_torch_backend_takes_a_broadcast_gradient():
    # y.sum() hands backward a zero-stride gradient, which torch's CPU kernel rejects unwrapped.
    torch.manual_seed(5)
    x = torch.randn(13, 8, requires_grad=True)
    w = torch.randn(3, 8, 12, requires_grad=True)
    grouped_mm(x, w, _offsets([4, 0, 9]), backend="grouped_mm").sum().backward()
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    grouped_mm_reference(x_ref, w_ref, _offsets([4, 0, 9])).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(w.grad, w_ref.grad)


def test_autocast_casts_like_a_matmul():
    torch.manual_seed(6)
    x, w, off = torch.randn(11, 8), torch.randn(2, 8, 16), _offsets([4, 7])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_mm(x, w, off)
        expected = torch.cat([x[:4] @ w[0], x[4:] @ w[1]])
    assert y.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
