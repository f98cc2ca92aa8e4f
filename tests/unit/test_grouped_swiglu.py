"""grouped_swiglu and its written-out backward against autograd of the reference loop.

Shape legend: N rows, D model width, H hidden width, E groups.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_within_dtype_error, relative_errors

from sparsetron.kernels.grouped_mm import (
    grouped_mm,
    grouped_swiglu,
    grouped_swiglu_backward,
    grouped_swiglu_backward_dw,
    grouped_swiglu_backward_dx,
    grouped_swiglu_forward,
    grouped_swiglu_reference,
)
from sparsetron.model.config import ModelConfig, MoEConfig
from sparsetron.model.moe.layer import MoE

NAMES = ("y", "dx", "dw13", "dw2", "dscale")
# (N, D, H, rows per group): empty groups first, last and between, a group of one row, uneven
# sizes, and N past the groups' rows (the tail belongs to none). D and H multiples of 8 so that
# torch's grouped_mm (16-byte aligned strides) runs the same cases in bf16.
CASES = [(41, 16, 24, [5, 0, 12, 1, 19, 0]), (29, 8, 16, [0, 29, 0]), (7, 8, 8, [0, 0, 1, 0, 4]), (1, 8, 8, [1])]
BACKENDS = ["loop", "grouped_mm"]


@pytest.fixture
def nan_empty():
    """torch.empty fills with NaN: an output element the code forgets to write fails."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous[0])
    torch.utils.deterministic.fill_uninitialized_memory = previous[1]


def _inputs(N, D, H, counts, seed):
    g = torch.Generator().manual_seed(seed)
    E = len(counts)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w13 = torch.randn(E, D, 2 * H, generator=g, dtype=torch.float64) / D**0.5
    w2 = torch.randn(E, H, D, generator=g, dtype=torch.float64) / H**0.5
    dy = torch.randn(N, D, generator=g, dtype=torch.float64)
    return x, w13, w2, torch.tensor(counts).cumsum(0).to(torch.int32), dy


def _scale(N, seed):
    """Routing weights: positive, spread over (0.05, 1]."""
    return torch.rand(N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.95 + 0.05


def _run(fn, x, w13, w2, offsets, dy, dtype, scale=None):
    """[y, dx, dw13, dw2] (+ dscale with a scale, kept in fp32 under a 16-bit dtype, as the router gives it)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, w13, w2)]
    if scale is not None:
        leaves.append(scale.detach().to(torch.promote_types(dtype, torch.float32)).requires_grad_())
    y = fn(*leaves[:3], offsets, *leaves[3:])
    y.backward(dy.to(y.dtype))
    return [y.detach()] + [t.grad for t in leaves]


def _ours(backend):
    return lambda x, w13, w2, offsets, scale=None: grouped_swiglu(x, w13, w2, offsets, backend, scale)


def _in_groups(t, offsets):
    """Rows that belong to a group: torch's kernel leaves the others unspecified."""
    return t[: int(offsets[-1])]


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("N,D,H,counts", CASES)
def test_loop_fp64_matches_autograd_of_the_reference(N, D, H, counts, scaled, nan_empty):
    x, w13, w2, off, dy = _inputs(N, D, H, counts, seed=N)
    scale = _scale(N, seed=N) if scaled else None
    ours = _run(_ours("loop"), x, w13, w2, off, dy, torch.float64, scale)
    ref = _run(grouped_swiglu_reference, x, w13, w2, off, dy, torch.float64, scale)
    assert len(ours) == len(ref) == (5 if scaled else 4)
    for name, o, r in zip(NAMES, ours, ref, strict=False):
        assert o.dtype == torch.float64 and torch.isfinite(o).all(), name
        worst = relative_errors(o, r).max().item()
        assert worst <= 64 * torch.finfo(torch.float64).eps, f"{name}: per-element error {worst:.2e}"
    # The tail rows belong to no group: zero output and zero input gradient, as the reference gives.
    end = int(off[-1])
    assert torch.equal(ours[0][end:], torch.zeros(N - end, D)) and torch.equal(ours[1][end:], torch.zeros(N - end, D))
    if scaled:
        assert torch.equal(ours[4][end:], torch.zeros(N - end, dtype=torch.float64))


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,D,H,counts", CASES)
def test_within_the_dtype_error_of_the_reference(N, D, H, counts, dtype, backend, scaled, nan_empty):
    x, w13, w2, off, dy = _inputs(N, D, H, counts, seed=3 * N + 1)
    scale = _scale(N, seed=N + 2) if scaled else None
    exact = _run(grouped_swiglu_reference, x, w13, w2, off, dy, torch.float64, scale)
    torch_own = _run(grouped_swiglu_reference, x, w13, w2, off, dy, dtype, scale)
    ours = _run(_ours(backend), x, w13, w2, off, dy, dtype, scale)
    for name, o, t, r in zip(NAMES, ours, torch_own, exact, strict=False):
        assert o.dtype == (torch.float32 if name == "dscale" else dtype), name
        if name in ("y", "dx", "dscale"):
            o, t, r = (_in_groups(v, off) for v in (o, t, r))
        assert_within_dtype_error(f"{backend} {name}", o, r, t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_split_backward_on_chunks_adds_up_to_the_whole(backend):
    """An overlapped dispatcher computes each chunk's dx at once and its dW later: chunks of
    each group's rows, each with its own offsets; their weight gradients sum to the whole's."""
    counts_a, counts_b = [3, 0, 5, 1], [4, 2, 0, 6]
    E, D, H = len(counts_a), 8, 12
    x, w13, w2, _, dy = _inputs(sum(counts_a) + sum(counts_b), D, H, [0] * E, seed=11)
    x, w13, w2, dy = (t.float() for t in (x, w13, w2, dy))
    scale = _scale(x.shape[0], seed=12).float()
    off_a, off_b = (torch.tensor(c).cumsum(0).to(torch.int32) for c in (counts_a, counts_b))
    chunks = [(slice(0, sum(counts_a)), off_a), (slice(sum(counts_a), None), off_b)]
    pending, dx_parts = [], []
    for rows, off in chunks:
        _, h13 = grouped_swiglu_forward(x[rows], w13, w2, off, backend, scale[rows])
        dx, dh13, dscale = grouped_swiglu_backward_dx(dy[rows], x[rows], h13, w13, w2, off, backend, scale[rows])
        dx_parts.append((dx, dscale))
        pending.append((dy[rows], x[rows], h13, dh13, off, backend, scale[rows]))
    dw13, dw2 = (sum(parts) for parts in zip(*(grouped_swiglu_backward_dw(*p) for p in pending), strict=True))

    # The whole: the chunks' rows regrouped by expert.
    order = []
    starts_a, starts_b = off_a - torch.tensor(counts_a), off_b - torch.tensor(counts_b) + sum(counts_a)
    for g in range(E):
        order += list(range(starts_a[g], starts_a[g] + counts_a[g])) + list(
            range(starts_b[g], starts_b[g] + counts_b[g])
        )
    order = torch.tensor(order)
    off = (torch.tensor(counts_a) + torch.tensor(counts_b)).cumsum(0).to(torch.int32)
    args = (x[order], w13, w2, off, dy[order])
    exact = _run(grouped_swiglu_reference, *args, torch.float64, scale[order])
    torch_own = _run(grouped_swiglu_reference, *args, torch.float32, scale[order])
    got_dx, got_dscale = (torch.cat(parts)[order] for parts in zip(*dx_parts, strict=True))
    split = (got_dx, dw13, dw2, got_dscale)
    for name, got, t, r in zip(NAMES[1:], split, torch_own[1:], exact[1:], strict=True):
        assert_within_dtype_error(name, got, r, t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_fused_backward_is_the_split_one(backend, nan_empty):
    x, w13, w2, off, dy = (t.float() if t.is_floating_point() else t for t in _inputs(23, 8, 12, [6, 0, 1, 16], 5))
    scale = _scale(23, seed=6).float()
    _, h13 = grouped_swiglu_forward(x, w13, w2, off, backend, scale)
    fused = grouped_swiglu_backward(dy, x, h13, w13, w2, off, backend, scale)
    dx, dh13, dscale = grouped_swiglu_backward_dx(dy, x, h13, w13, w2, off, backend, scale)
    split = (dx, *grouped_swiglu_backward_dw(dy, x, h13, dh13, off, backend, scale), dscale)
    for name, a, b in zip(NAMES[1:], fused, split, strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(fused[1][1], torch.zeros(8, 24)) and torch.equal(fused[2][1], torch.zeros(12, 8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_and_strided_output_gradients(backend):
    x, w13, w2, off, _ = (t.float() if t.is_floating_point() else t for t in _inputs(19, 8, 12, [7, 0, 12], 9))
    g = torch.Generator().manual_seed(10)
    broadcast = torch.randn(1, 8, generator=g).expand(19, 8)
    strided = torch.randn(8, 19, generator=g).T  # column-major
    for dy in (broadcast, strided):
        ours = _run(_ours(backend), x, w13, w2, off, dy, torch.float32)
        ref = _run(grouped_swiglu_reference, x, w13, w2, off, dy.contiguous(), torch.float32)
        for name, o, r in zip(NAMES, ours, ref, strict=False):
            torch.testing.assert_close(o, r, rtol=0, atol=0, msg=name)


def _old_path(x, w13, w2, offsets, backend="auto"):
    """GroupedExperts' SwiGLU before grouped_swiglu: two grouped_mm and autograd between them."""
    h1, h3 = grouped_mm(x, w13, offsets, backend).chunk(2, dim=-1)
    return grouped_mm(F.silu(h1) * h3, w2, offsets, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_under_cpu_autocast_within_the_error_of_what_grouped_mm_gave(backend):
    """fp32 operands under bf16 autocast: bf16 results (fp32 gradients for the fp32 leaves) within
    the error of the old path (two grouped_mm, autograd between them) under the same autocast,
    both against that path in fp64."""
    x, w13, w2, off, dy = _inputs(37, 16, 24, [9, 0, 3, 25], 12)
    exact = _run(lambda *a: _old_path(*a, backend="loop"), x, w13, w2, off, dy, torch.float64)
    outs = []
    for fn in (_ours(backend), lambda *a: _old_path(*a, backend=backend)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(_run(fn, x, w13, w2, off, dy, torch.float32))
    assert outs[0][0].dtype == torch.bfloat16 and outs[0][1].dtype == torch.float32
    for name, ours, old, ref in zip(NAMES, *outs, exact, strict=False):
        if name in ("y", "dx"):
            ours, old, ref = (_in_groups(v, off) for v in (ours, old, ref))
        assert_within_dtype_error(name, ours, ref, old)


def _saved_bytes(fn, *args):
    """Bytes of distinct storages autograd keeps for backward, inputs excluded."""
    inputs = {t.untyped_storage().data_ptr() for t in args}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in inputs:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(kept.values())


def test_keeps_half_the_activations_autograd_keeps():
    N, D, H = 40, 16, 24
    x, w13, w2, off, _ = (t.float() if t.is_floating_point() else t for t in _inputs(N, D, H, [10, 0, 30], 13))
    x, w13, w2 = (t.requires_grad_() for t in (x, w13, w2))
    ours = _saved_bytes(lambda *a: grouped_swiglu(*a, "loop"), x, w13, w2, off)
    autograd = _saved_bytes(grouped_swiglu_reference, x, w13, w2, off)
    assert ours == 2 * N * H * 4 and autograd >= 4 * N * H * 4, (ours, autograd)


def test_bad_input_names_the_shapes():
    x, w13, w2, off = torch.randn(6, 4), torch.randn(3, 4, 10), torch.randn(3, 5, 4), torch.tensor([1, 2, 6])
    with pytest.raises(ValueError, match=r"w2 \(3, 4, 4\)"):
        grouped_swiglu(x, w13, torch.randn(3, 4, 4), off)
    with pytest.raises(ValueError, match=r"w13 \(3, 4, 9\)"):
        grouped_swiglu(x, torch.randn(3, 4, 9), w2, off)
    with pytest.raises(ValueError, match="one entry per group"):
        grouped_swiglu(x, w13, w2, torch.tensor([1, 6]))
    with pytest.raises(ValueError, match="non-decreasing"):
        grouped_swiglu(x, w13, w2, torch.tensor([1, 2, 7]), "loop")
    with pytest.raises(ValueError, match="share a dtype"):
        grouped_swiglu(x, w13.double(), w2, off)
    with pytest.raises(ValueError, match=r"scale must be floating, one per row of x \(6\), got torch.float32 \(5,\)"):
        grouped_swiglu(x, w13, w2, off, "loop", torch.rand(5))


def test_moe_layer_output_and_grads_unchanged_from_the_autograd_path():
    """The MoE layer with grouped_swiglu (routing weights scaling the hidden activation) against
    the same layer computing its experts as before (two grouped_mm, autograd, the outputs
    weighted after), in fp32, within fp32's error of the old path against itself in fp64."""
    cfg = MoEConfig(num_experts=8, top_k=3, expert_hidden=12, n_shared_experts=1, expert_backend="loop")
    torch.manual_seed(14)
    layer = MoE(16, ModelConfig(dim=16, ffn_hidden=32), cfg)
    layer.init_weights(0.3, 0.2)
    x, dy = torch.randn(2, 23, 16), torch.randn(2, 23, 16)

    def run(dtype, old):
        moe = MoE(16, ModelConfig(dim=16, ffn_hidden=32), replace(cfg))
        moe.load_state_dict(layer.state_dict())
        moe.to(dtype)
        if old:
            experts = moe.experts
            offsets = lambda counts: torch.cumsum(counts, 0).to(torch.int32)  # noqa: E731
            # The rows' outputs weighted after the experts, as the combine did before.
            experts.forward = lambda x_ND, counts, weights_N: (
                weights_N.unsqueeze(-1).to(x_ND.dtype)
                * _old_path(x_ND, experts.w13, experts.w2, offsets(counts), "loop")
            )
        xi = x.to(dtype).requires_grad_()
        y = moe(xi)
        y.backward(dy.to(dtype))
        return {"y": y.detach(), "dx": xi.grad} | {n: p.grad for n, p in moe.named_parameters()}

    exact, before, now = run(torch.float64, old=True), run(torch.float32, old=True), run(torch.float32, old=False)
    assert exact.keys() == now.keys() and "experts.w13" in now
    for name in exact:
        rows = [t[name].reshape(-1, t[name].shape[-1]) for t in (now, exact, before)]
        assert_within_dtype_error(name, *rows)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiles_and_matches_eager(backend):
    """torch's grouped_mm path traces whole (a compiled block keeps it in its graph); the loop
    runs eagerly inside a compiled caller. bf16: torch's grouped_mm has a meta kernel for it."""
    x, w13, w2, off, dy = _inputs(29, 16, 24, [7, 0, 1, 21], seed=15)
    fn = torch.compile(_ours(backend), backend="aot_eager", fullgraph=backend == "grouped_mm")
    torch._dynamo.reset()
    scale = _scale(29, seed=16)
    compiled = _run(fn, x, w13, w2, off, dy, torch.bfloat16, scale)
    eager = _run(_ours(backend), x, w13, w2, off, dy, torch.bfloat16, scale)
    for name, c, e in zip(NAMES, compiled, eager, strict=True):
        torch.testing.assert_close(c, e, rtol=0, atol=0, msg=name)
