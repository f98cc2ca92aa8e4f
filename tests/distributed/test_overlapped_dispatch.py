"""The overlapped dispatcher computes what the plain all-to-all dispatcher computes.

On 4 gloo ranks, over ep groups of 2 and of 4: the MoE output, the shared experts' output it
hands back, and the gradients of the tokens, the routing weights and this rank's expert weights,
for chunk counts 1, 3 and 8 (8 exceeds the tokens of the small case: empty chunks), dropless and
with capacity drops (both policies), with routing skewed so that some ranks receive no row for
some expert, and in fp64 (exact up to the order weight gradients sum in), fp32 (within 1e-5
relative, the issue's bound) and bf16 autocast (within bf16's own rounding). One chunk takes
the plain dispatcher's operations in the same order: bitwise equal.

Inputs are fresh random draws on every run; the seed is in every failure message.
"""

from __future__ import annotations

import random
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed

from sparsetron.model.moe.experts import GroupedExperts
from sparsetron.model.moe.router import RouterOutput
from sparsetron.parallel.all_to_all_dispatch import AllToAllDispatcher
from sparsetron.parallel.exchange import Exchange
from sparsetron.parallel.overlapped_dispatch import OverlappedDispatcher

E, D, H, K = 8, 12, 10, 3
CHUNKS = (1, 3, 8)
# name: (tokens on rank r = base + 2 r, capacity factor, drop policy, skewed routing)
CASES = {
    "dropless": (40, 0.0, "probability", False),
    "few-tokens": (2, 0.0, "probability", False),
    "capacity-probability": (40, 0.75, "probability", False),
    "capacity-position-skewed": (40, 1.0, "position", True),
}
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16-autocast": torch.bfloat16}


def inputs(rank: int, seed: int, base: int, skewed: bool, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    T = base + 2 * rank
    scores_TE = torch.rand(T, E, generator=gen, dtype=torch.float64)
    if skewed:
        # Every token chooses experts 0, 1 and 2 (K = 3): the ranks holding the others receive
        # no row at all (under ep2, ranks 1 and 3 receive nothing).
        scores_TE[:, :K] += 2.0
    indices_Tk = scores_TE.topk(K, dim=-1).indices
    weights_Tk = torch.softmax(torch.randn(T, K, generator=gen, dtype=torch.float64), dim=-1)
    x_TD = torch.randn(T, D, generator=gen, dtype=torch.float64)
    grads = torch.randn(2, T, D, generator=gen, dtype=torch.float64)
    param_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    cast = lambda t: t.to(param_dtype)  # noqa: E731
    return cast(x_TD), indices_Tk, weights_Tk.float(), cast(grads)


def experts_on_rank(seed: int, ep_rank: int, L: int, dtype: torch.dtype) -> GroupedExperts:
    """This ep rank's L experts, cut from one global draw every rank makes alike."""
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, D, 2 * H, generator=gen, dtype=torch.float64) / D**0.5
    w2 = torch.randn(E, H, D, generator=gen, dtype=torch.float64) / H**0.5
    experts = GroupedExperts(L, D, H, backend="loop").to(dtype)
    with torch.no_grad():
        experts.w13.copy_(w13[ep_rank * L : (ep_rank + 1) * L])
        experts.w2.copy_(w2[ep_rank * L : (ep_rank + 1) * L])
    return experts


def run_once(dispatcher, experts, x_TD, indices_Tk, weights_Tk, grads, autocast):
    x = x_TD.clone().requires_grad_()
    w = weights_Tk.clone().requires_grad_()
    experts.zero_grad(set_to_none=True)
    routing = RouterOutput(indices_Tk, w, None, None)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
    with ctx:
        y_TD, shared_TD, dropped = dispatcher.run(x, routing, experts, lambda: torch.tanh(x) * 0.5)
    ((y_TD.float() * grads[0]).sum() + (shared_TD.float() * grads[1]).sum()).backward()
    return {
        "y": y_TD.detach().double(),
        "shared": shared_TD.detach().double(),
        "dropped": int(dropped),
        "x_grad": x.grad.double(),
        "w_grad": w.grad.double(),
        "w13_grad": experts.w13.grad.double(),
        "w2_grad": experts.w2.grad.double(),
    }


def worker(seed):
    rank = dist.get_rank()
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    groups = {"ep2": pairs[rank // 2], "ep4": dist.group.WORLD}
    out = {}
    for group_name, group in groups.items():
        exchange = Exchange(group)
        P = exchange.size
        ep_rank = dist.get_rank(group)
        for case, (base, factor, policy, skewed) in CASES.items():
            for dtype_name, dtype in DTYPES.items():
                autocast = dtype == torch.bfloat16
                experts = experts_on_rank(seed, ep_rank, E // P, torch.float32 if autocast else dtype)
                args = inputs(rank, seed, base, skewed, dtype)
                plain = run_once(AllToAllDispatcher(E, exchange, factor, policy), experts, *args, autocast)
                for chunks in CHUNKS:
                    overlapped = OverlappedDispatcher(E, exchange, chunks, factor, policy)
                    got = run_once(overlapped, experts, *args, autocast)
                    out[(group_name, case, dtype_name, chunks)] = (got, plain)
    return out


def rms(t: torch.Tensor) -> float:
    return t.pow(2).mean().sqrt().item() if t.numel() else 0.0


def peak(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


@pytest.fixture(scope="module")
def results():
    seed = random.randrange(2**31)
    return seed, run_distributed(worker, 4, seed, timeout=300)


@pytest.mark.parametrize("group", ["ep2", "ep4"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_overlapped_equals_plain_all_to_all(results, group, case, dtype_name):
    """fp64 and fp32: within 1e-12 and 1e-5 of the plain dispatcher, relative to each tensor's
    RMS. bf16 autocast: no further from the fp64 run than (chunks + 1) x the plain dispatcher's
    own error (what one bf16 rounding costs it, floored at one bf16 unit of the tensor's largest
    magnitude): each chunk's weight gradient is rounded to bf16 before the fp32 sum, then the sum
    once. (A floor at the RMS failed one seed in about 30 at ep4 with few tokens: at 3 chunks w2's
    gradient measured 1.07x such a bound, where the plain dispatcher's own error was small by
    chance; the typical worst case is 0.4-0.65x.)"""
    seed, per_rank = results
    for rank, out in enumerate(per_rank):
        exact = out[(group, case, "fp64", 1)][1]
        for chunks in CHUNKS:
            got, plain = out[(group, case, dtype_name, chunks)]
            where = f"seed {seed}, rank {rank}, {group}, {case}, {dtype_name}, {chunks} chunks"
            assert got["dropped"] == plain["dropped"], where
            for key in ("y", "shared", "x_grad", "w_grad", "w13_grad", "w2_grad"):
                a, b = got[key], plain[key]
                if chunks == 1:
                    assert torch.equal(a, b), f"{key} not bitwise equal with one chunk ({where})"
                if dtype_name == "bf16-autocast":
                    allowed = (chunks + 1) * max(max_error(b, exact[key]), 2**-8 * peak(exact[key]))
                    err = max_error(a, exact[key])
                else:
                    allowed = {"fp64": 1e-12, "fp32": 1e-5}[dtype_name] * rms(b)
                    err = max_error(a, b)
                assert err <= allowed, f"{key}: max error {err:.3g} > {allowed:.3g} ({where})"
