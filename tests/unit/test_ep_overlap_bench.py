"""benchmarks/ep_overlap.py's core in one process: the simulated link completes an exchange no earlier
than bytes / bandwidth after it started (one at a time, asleep), the loopback transport computes the
layer the local dispatcher computes, the bytes counted at the seam are the formula's, and the
fractions (hidden, and comm ∩ compute from a trace) are the definitions'.

Shape legend: T tokens, D model dim, E experts, k experts per token, P ep ranks, L = E / P.
"""

from __future__ import annotations

import time

import ep_overlap
import pytest
import torch
from ep_overlap_core import PLAIN, Spec, build_layer, dispatcher_kinds, fraction_hidden, inputs, step
from ep_overlap_gpu import stream_overlap
from ep_overlap_links import BalancedRouter, LoopbackExchange, SimulatedLink
from tolerance import assert_within_dtype_error

from sparsetron.model.moe.dispatch import LocalDispatcher

SPEC = Spec(tokens=96, dim=24, experts=8, hidden=16, top_k=2)
# The OS wakes a sleeper late, never early: on a shared 2-core machine at load 9, by up to tens of
# ms. Below half a transfer, so a link that blocks its caller or sends a rank's own share still fails.
WAKE_SLACK_S = 0.08


def test_the_link_completes_after_bytes_over_bandwidth_from_start_one_exchange_at_a_time():
    P, D = 4, 64
    bytes_per_s, latency_s = 2e6, 0.01
    link = SimulatedLink(P, bytes_per_s, latency_s, rank=1)
    # Half the rows stay on rank 1 (its own share), the rest leave: 1500 rows x 64 fp32 = 384 kB.
    splits = [500, 1500, 600, 400]
    inp = torch.randn(sum(splits), D)
    transfer_s = latency_s + (sum(splits) - splits[1]) * D * 4 / bytes_per_s  # 0.202 s
    outs = [torch.full_like(inp, float("nan")) for _ in range(2)]

    start = time.monotonic()
    first = link.start(outs[0], inp, splits, splits)
    second = link.start(outs[1], inp, splits, splits)
    # Starting returns at once, even with the link busy: the caller computes meanwhile.
    assert time.monotonic() - start < WAKE_SLACK_S
    # Compute while the first is in flight: its wait sleeps only the rest.
    while time.monotonic() - start < transfer_s / 2:
        pass
    computed = time.monotonic() - start
    first.wait()
    t_first = time.monotonic() - start
    cpu_before = time.process_time()
    second.wait()
    t_second = time.monotonic() - start
    # Asleep, not spinning: the link takes no core from the experts (a spin would use ~ the whole wait).
    assert time.process_time() - cpu_before < 0.1 * (t_second - t_first)

    assert transfer_s <= t_first <= transfer_s + WAKE_SLACK_S
    # The second starts when the link is free: it ends a whole transfer after the first.
    assert 2 * transfer_s <= t_second <= 2 * transfer_s + WAKE_SLACK_S
    assert link.busy_s == pytest.approx(2 * transfer_s)
    # The caller slept from the end of its compute to the end (no more than the wall time), less at
    # most how late it woke from the first.
    assert 2 * transfer_s - computed - WAKE_SLACK_S <= link.waited_s <= t_second - computed
    for out in outs:
        assert torch.equal(out, inp)


def test_loopback_refuses_to_receive_other_than_it_sent():
    with pytest.raises(ValueError, match="loopback receives what it sends"):
        LoopbackExchange(2).start(torch.empty(5, 3), torch.empty(5, 3), [3, 2], [2, 3])
    with pytest.raises(ValueError, match="loopback receives what it sends"):
        LoopbackExchange(2).start(torch.empty(5, 3), torch.empty(4, 3))


def grads(layer, x_TD):
    return [x_TD.grad] + [p.grad for p in layer.parameters()]


def test_loopback_at_one_rank_computes_what_the_local_dispatcher_does():
    x_TD, dy_TD = inputs(SPEC, 0)
    looped = build_layer(SPEC, 1, 0, LoopbackExchange(1), dispatcher_kinds([])[PLAIN], balanced=False)
    local = build_layer(SPEC, 1, 0, LoopbackExchange(1), dispatcher_kinds([])[PLAIN], balanced=False)
    local.dispatcher = LocalDispatcher(SPEC.num_experts)
    step(looped, x_TD, dy_TD)
    y_looped, g_looped = looped(x_TD), grads(looped, x_TD)
    step(local, x_TD, dy_TD)
    y_local, g_local = local(x_TD), grads(local, x_TD)
    # At P = 1 the exchange is a copy and the regroup the identity: the same operations in the same order.
    assert torch.equal(y_looped, y_local)
    for a, b in zip(g_looped, g_local, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("balanced", [True, False])
def test_loopback_at_p_ranks_sends_expert_p_l_plus_l_to_local_expert_l(balanced):
    """A rank's L experts take the rows of experts l, L + l, ... (it receives its own rows): the local
    dispatcher with the rank's experts tiled P times, in fp64, is the reference."""
    P, rank = 2, 1
    x_TD, dy_TD = inputs(SPEC, 0)
    looped = build_layer(SPEC, P, rank, LoopbackExchange(P, rank), dispatcher_kinds([])[PLAIN], balanced)

    def tiled(dtype):
        layer = build_layer(SPEC, 1, 0, LoopbackExchange(1), dispatcher_kinds([])[PLAIN], balanced).to(dtype)
        layer.dispatcher = LocalDispatcher(SPEC.num_experts)
        L = SPEC.num_experts // P
        with torch.no_grad():
            # The rank's slice of the one seeded set of E experts, taken here, not from the layer under test.
            for w in (layer.experts.w13, layer.experts.w2):
                w.copy_(w[rank * L : (rank + 1) * L].repeat(P, 1, 1))
        return layer

    x64_TD = x_TD.detach().double().requires_grad_(True)
    exact, fp32 = tiled(torch.float64), tiled(torch.float32)
    step(exact, x64_TD, dy_TD.double())
    step(fp32, x_TD, dy_TD)
    dx_fp32 = x_TD.grad
    step(looped, x_TD, dy_TD)
    assert_within_dtype_error("loopback dx", x_TD.grad, x64_TD.grad, dx_fp32)
    with torch.no_grad():
        assert_within_dtype_error("loopback y", looped(x_TD), exact(x64_TD), fp32(x_TD))


def test_balanced_routing_gives_every_expert_its_share_and_each_token_distinct_experts():
    layer = build_layer(SPEC, 2, 0, LoopbackExchange(2), dispatcher_kinds([])[PLAIN], balanced=True)
    assert isinstance(layer.router, BalancedRouter)
    x_TD, _ = inputs(SPEC, 0)
    route = layer.router(x_TD)
    counts_E = torch.bincount(route.indices_Tk.reshape(-1), minlength=SPEC.num_experts)
    assert counts_E.tolist() == [SPEC.tokens * SPEC.k // SPEC.num_experts] * SPEC.num_experts
    assert all(len(set(row)) == SPEC.k for row in route.indices_Tk.tolist())
    # The router's own scores of the experts chosen here, renormalised like the router's (norm_topk_prob).
    chosen = route.scores_TE.gather(-1, route.indices_Tk)
    torch.testing.assert_close(route.weights_Tk, chosen / chosen.sum(-1, keepdim=True), rtol=0, atol=0)


@pytest.mark.parametrize("P", [2, 4])
def test_bytes_counted_at_the_seam_are_the_formula(P):
    exchange = LoopbackExchange(P)
    x_TD, dy_TD = inputs(SPEC, 0)
    step(build_layer(SPEC, P, 0, exchange, dispatcher_kinds([])[PLAIN], balanced=True), x_TD, dy_TD)
    t = exchange.traffic
    # Dispatch and combine, forward and backward: four exchanges of T k rows of D fp32 numbers;
    # the T k fp32 routing weights go with the dispatch and their gradients come back.
    assert t.row_bytes == 4 * SPEC.tokens * SPEC.k * SPEC.dim * 4 + 2 * SPEC.tokens * SPEC.k * 4
    assert t.leaving_bytes - t.count_bytes * (P - 1) / P == t.row_bytes * (P - 1) / P
    # One count exchange per forward: E int64.
    assert t.count_bytes == SPEC.num_experts * 8 and t.exchanges == 7
    total, leaving = ep_overlap.analytic_bytes_per_token(SPEC.k, SPEC.dim, 4, P)
    assert total * SPEC.tokens == t.row_bytes and leaving == total * (P - 1) / P


def test_the_overlapped_rows_over_the_loopback_compute_the_plain_rows_and_move_their_bytes():
    """C = 3 chunks of 96 tokens at ep 2: the same output and input gradient as the plain dispatcher
    (fp64 the reference, the plain fp32 run the dtype's own error), the same row bytes, and one
    [P, C, L] count exchange."""
    P, C = 2, 3
    kinds = dispatcher_kinds([C])
    overlapped = kinds[f"overlapped C={C}"]
    x_TD, dy_TD = inputs(SPEC, 0)

    def run(kind, dtype):
        exchange = LoopbackExchange(P, rank=1)
        layer = build_layer(SPEC, P, 1, exchange, kind, balanced=False).to(dtype)
        x = x_TD.detach().to(dtype).requires_grad_(True)
        step(layer, x, dy_TD.to(dtype))
        with torch.no_grad():
            y = layer(x)
        return y, x.grad, exchange.traffic

    y64, dx64, _ = run(kinds[PLAIN], torch.float64)
    y32, dx32, plain = run(kinds[PLAIN], torch.float32)
    y, dx, chunked = run(overlapped, torch.float32)
    assert_within_dtype_error("overlapped y", y, y64, y32)
    assert_within_dtype_error("overlapped dx", dx, dx64, dx32)
    assert chunked.row_bytes == plain.row_bytes and chunked.leaving_bytes > 0
    # Two forwards above (the step and the check): one count exchange of P x C x L int64 each.
    assert chunked.count_bytes == 2 * C * SPEC.num_experts * 8


def test_over_the_simulated_link_the_overlapped_dispatcher_waits_for_less_than_the_link_is_busy():
    """With a link as slow as the layer's compute, the plain dispatcher sleeps through all of it and
    the overlapped one (C = 4) through clearly less: its chunks travel while others compute. A
    slower (loaded) machine only computes longer, so hides more: the bound holds under load."""
    P, C = 2, 4
    x_TD, dy_TD = inputs(SPEC, 0)
    kinds = dispatcher_kinds([C])
    nocomm = build_layer(SPEC, P, 0, LoopbackExchange(P), kinds[PLAIN], balanced=True)
    compute_s = float("inf")
    for _ in range(3):
        # The least of three: a link fast for the compute makes hiding harder, not easier.
        start = time.perf_counter()
        step(nocomm, x_TD, dy_TD)
        compute_s = min(compute_s, time.perf_counter() - start)
    leaving = 4 * SPEC.tokens * SPEC.k * SPEC.dim * 4 / 2
    waits = {}
    for name in (PLAIN, f"overlapped C={C}"):
        link = SimulatedLink(P, leaving / compute_s)
        layer = build_layer(SPEC, P, 0, link, kinds[name], balanced=True)
        for _ in range(2):
            step(layer, x_TD, dy_TD)
        waits[name] = link.waited_s / link.busy_s
    assert waits[PLAIN] > 0.9
    assert waits[f"overlapped C={C}"] < 0.85


def test_fraction_hidden_is_the_definition():
    # Plain adds 100 ms of communication to a 100 ms step; the overlap adds 20: 80% hidden.
    assert fraction_hidden(120.0, 200.0, 100.0) == pytest.approx(0.8)
    assert fraction_hidden(200.0, 200.0, 100.0) == 0.0
    assert fraction_hidden(100.0, 200.0, 100.0) == 1.0
    assert fraction_hidden(90.0, 100.0, 100.0) != fraction_hidden(90.0, 100.0, 100.0)  # NaN: nothing to hide


def kernel(name, stream, start, end, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "ts": start, "dur": end - start, "args": {"stream": stream}}


def test_stream_overlap_merges_each_stream_before_intersecting():
    trace = {
        "traceEvents": [
            # Compute on stream 7: [0, 10) and [20, 30), with an overlapping pair that must merge.
            kernel("gemm", 7, 0, 6),
            kernel("gemm", 7, 4, 10),
            kernel("swiglu", 7, 20, 30),
            # A lesser compute stream (not the default) is not "compute".
            kernel("elementwise", 9, 10, 20),
            # Comm on stream 13: a copy then a sleep, [5, 25), overlapping each other.
            kernel("Memcpy DtoD", 13, 5, 12, cat="gpu_memcpy"),
            kernel("spin_kernel(long)", 13, 11, 25),
            # A CPU op is not a device event.
            {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 100, "args": {}},
        ]
    }
    # comm [5, 25) meets compute [5, 10) and [20, 25): 10 of 20.
    assert stream_overlap(trace) == {13: pytest.approx(0.5)}


def test_the_report_of_a_tiny_simulated_run():
    report = ep_overlap.main(
        ["--parts", "sim,bytes", "--tokens", "64", "--dim", "16", "--experts", "4", "--hidden", "8"]
        + ["--top-k", "2", "--eps", "2", "--routings", "balanced", "--reps", "1", "--link-gbps", "1000"]
    )
    assert "SIMULATED link" in report
    lines = [line for line in report.splitlines() if line.startswith("| 2 | balanced |")]
    assert [line.split("|")[3].strip() for line in lines] == ["no-comm (local copy)", *dispatcher_kinds([1, 2, 4, 8])]
    # Measured bytes equal the formula: k (D fp32 x 4 + fp32 weight x 2) = 528 per token, half leaving at ep 2.
    assert "| 2 | D = 16 | 528 | 264 | 528 | 264 |" in report


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--eps", "3"], "--eps 3 must be >= 1 and divide the 16 routed experts"),
        (["--granularity", "3"], "--granularity 3 must divide --hidden 128"),
        (["--parts", "gpu"], "--parts 'gpu': on cpu one of bytes, gloo, sim"),
        (["--link-gbps", "0"], "--link-gbps must be > 0"),
        (["--routings", "skewed"], "--routings 'skewed': balanced or real"),
    ],
)
def test_bad_flags_are_refused_by_name_before_any_work(argv, message):
    with pytest.raises(ValueError, match=message):
        ep_overlap.main(argv)
