"""Transports for benchmarks/ep_overlap.py: `Exchange`s that count what they move, replace the network
with a local copy (no-comm), or with a simulated link of a given bandwidth.

Shape legend: N rows sent, M rows received, D numbers per row, T tokens, k experts per token,
E routed experts.

Every expert exchange of the dispatchers goes through `parallel.exchange.Exchange`, so putting one
of these in its place changes the transport and nothing else.

Loopback: a rank "exchanges with itself". The count exchange returns the counts it sent, so the
rows a rank receives are the rows it sent, every shape stays what the real exchange would give
under balanced routing, and the rows it computes are its own (its L local experts take the rows
of expert l, L + l, 2L + l, ...). The row exchange is one local copy, as the real exchange's own
share is.

Simulated link: the loopback's copy, plus a completion time no earlier than start + latency +
(bytes that would leave the rank) / bandwidth. Exchanges are serialised on the link (one starts
when the previous one has finished), as on one NIC; `wait` sleeps until the completion time, so
the link uses no core. On a GPU the same model runs on a side stream: the copy, then
`torch.cuda._sleep` for the transfer's duration (a spin of one warp: no SM work to speak of).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from sparsetron.model.moe.router import Router, RouterOutput
from sparsetron.parallel.exchange import Exchange, Pending


@dataclass
class Traffic:
    """What the exchanges of one rank moved, as counted at the seam."""

    rank: int
    """The rank whose sends stay local (its own share does not leave it)."""
    exchanges: int = 0
    row_bytes: int = 0
    """Bytes of every exchange of floating-point rows (the token rows, their routing weights and
    the gradients of both)."""
    count_bytes: int = 0
    """Bytes of the integer exchanges (the per-expert, per-chunk row counts)."""
    leaving_bytes: int = 0
    """Bytes of all exchanges that go to another rank: what a network carries."""

    def add(self, inp: torch.Tensor, in_splits: list[int] | None, size: int) -> int:
        """Count one exchange of `inp` split by `in_splits` over `size` ranks; returns its leaving bytes."""
        rows = inp.shape[0]
        splits = in_splits if in_splits is not None else [rows // size] * size
        if len(splits) != size or sum(splits) != rows:
            raise ValueError(f"in_splits {splits} do not split {rows} rows over {size} ranks")
        per_row = inp.nbytes // max(rows, 1)
        leaving = (rows - splits[self.rank]) * per_row
        self.exchanges += 1
        if inp.is_floating_point():
            self.row_bytes += inp.nbytes
        else:
            self.count_bytes += inp.nbytes
        self.leaving_bytes += leaving
        return leaving


class CountingExchange(Exchange):
    """The real exchange over `group`, counting what passes through it."""

    def __init__(self, group: dist.ProcessGroup):
        super().__init__(group)
        self.traffic = Traffic(rank=dist.get_rank(group))

    def start(self, out, inp, out_splits=None, in_splits=None) -> Pending:
        self.traffic.add(inp, in_splits, self.size)
        return super().start(out, inp, out_splits, in_splits)


class LoopbackExchange(Exchange):
    """No communication: every exchange is a local copy of what was sent (see the module docstring).
    `size` is the ep degree the dispatcher believes in; `rank` the one this process stands for."""

    def __init__(self, size: int, rank: int = 0):
        # No process group: nothing leaves this process.
        self.group = None
        self.size = size
        self._side_stream = None
        self.traffic = Traffic(rank=rank)

    def start(self, out, inp, out_splits=None, in_splits=None) -> Pending:
        same_splits = (out_splits is None) == (in_splits is None) and list(out_splits or []) == list(in_splits or [])
        if out.shape != inp.shape or not same_splits:
            raise ValueError(
                f"loopback receives what it sends: out {tuple(out.shape)} splits {out_splits} "
                f"against inp {tuple(inp.shape)} splits {in_splits}"
            )
        leaving = self.traffic.add(inp, in_splits, self.size)
        return self._transfer(out, inp, leaving)

    def _transfer(self, out: torch.Tensor, inp: torch.Tensor, leaving_bytes: int) -> Pending:
        out.copy_(inp)
        return Pending(None)


class _SleepUntil(Pending):
    """An exchange that completes at `done` (time.monotonic seconds); `wait` sleeps until then."""

    def __init__(self, link: SimulatedLink, done: float):
        super().__init__(None)
        self._link, self._done = link, done

    def wait(self) -> None:
        if self._done is None:
            return
        left = self._done - time.monotonic()
        if left > 0:
            time.sleep(left)
        self._link.waited_s += max(left, 0.0)
        self._done = None


class SimulatedLink(LoopbackExchange):
    """Loopback, completing each exchange after latency + leaving bytes / bandwidth, one at a time."""

    def __init__(self, size: int, bytes_per_s: float, latency_s: float = 0.0, rank: int = 0):
        super().__init__(size, rank)
        if bytes_per_s <= 0 or latency_s < 0:
            raise ValueError(f"a simulated link needs bandwidth > 0 and latency >= 0, got {bytes_per_s}, {latency_s}")
        self.bytes_per_s, self.latency_s = bytes_per_s, latency_s
        self.link_free = 0.0
        self.busy_s = 0.0
        """Seconds the link spent transferring (what a plain, unoverlapped dispatcher waits for)."""
        self.waited_s = 0.0
        """Seconds the caller slept in `wait` (the communication that was not hidden)."""

    def _transfer(self, out, inp, leaving_bytes):
        out.copy_(inp)
        duration = self.latency_s + leaving_bytes / self.bytes_per_s
        done = max(time.monotonic(), self.link_free) + duration
        self.link_free = done
        self.busy_s += duration
        return _SleepUntil(self, done)


class _StreamPending(Pending):
    def __init__(self, event: torch.cuda.Event):
        super().__init__(None)
        self._event = event

    def wait(self) -> None:
        torch.cuda.current_stream().wait_event(self._event)


class CudaSimulatedLink(LoopbackExchange):
    """The simulated link on one GPU: copy and sleep on a side stream, the compute stream fenced both ways.

    Exchanges queue on the one side stream, so they are serialised like SimulatedLink's. The sleep
    lasts `cycles_per_s` x seconds of GPU clock (see `gpu_cycles_per_s`).
    """

    def __init__(self, size: int, bytes_per_s: float, cycles_per_s: float, latency_s: float = 0.0, rank: int = 0):
        super().__init__(size, rank)
        self.bytes_per_s, self.latency_s, self.cycles_per_s = bytes_per_s, latency_s, cycles_per_s
        self.stream = torch.cuda.Stream()

    def _transfer(self, out, inp, leaving_bytes):
        compute = torch.cuda.current_stream()
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            out.copy_(inp)
            torch.cuda._sleep(int((self.latency_s + leaving_bytes / self.bytes_per_s) * self.cycles_per_s))
            done = torch.cuda.Event()
            done.record()
        # The caller may drop both buffers before the side stream is done with them.
        inp.record_stream(self.stream)
        out.record_stream(self.stream)
        return _StreamPending(done)


def gpu_cycles_per_s(cycles: int = 20_000_000) -> float:
    """GPU clock cycles per second as `torch.cuda._sleep` counts them, timed with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(cycles // 10)  # the first launch pays for loading the kernel
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / (start.elapsed_time(end) * 1e-3)


class BalancedRouter(nn.Module):
    """The layer's router, with its choices replaced round-robin: assignment a = t * k + j goes to
    expert a mod E, so every expert gets exactly T * k / E rows (when E divides T * k) and every
    rank the same share. The router still runs, and the weights are its scores of the experts
    chosen here (renormalised like the router's when it renormalises), so the backward has the
    work of a real one."""

    def __init__(self, router: Router):
        super().__init__()
        self.router = router

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        out = self.router(x_TD)
        T, k = out.indices_Tk.shape
        E = out.scores_TE.shape[-1]
        indices_Tk = torch.arange(T * k, device=x_TD.device).remainder_(E).view(T, k)
        weights_Tk = out.scores_TE.gather(-1, indices_Tk)
        if self.router.norm_topk_prob:
            weights_Tk = weights_Tk / weights_Tk.sum(dim=-1, keepdim=True)
        return RouterOutput(indices_Tk, weights_Tk * self.router.route_scale, out.scores_TE, out.logits_TE)
