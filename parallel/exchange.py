"""Row exchanges between expert-parallel ranks: an all-to-all started now and finished later.

Shape legend: N rows this rank sends, M rows it receives, D numbers per row.

The expert dispatchers move tokens only through an `Exchange`, so that (1) the overlapped
dispatcher can keep several exchanges in flight while it computes, and (2) a benchmark can
put a simulated link or a local copy in the place of the network without touching the
dispatchers (see benchmarks/ep_overlap.py).

How the work runs asynchronously:

- CPU (gloo): gloo runs every collective on its own threads; `start` returns its work handle
  and `wait` joins it. The tensors stay referenced by the handle until then.
- CUDA (NCCL): every exchange is issued from one dedicated side stream. `start` makes the
  side stream wait for the compute stream (the rows to send were written there), issues the
  collective (NCCL's own stream waits for the side stream), and records both buffers on the
  side stream (`record_stream`; ProcessGroupNCCL holds them for its own stream), so the caching
  allocator does not hand their memory to a compute-stream tensor while the exchange still
  reads or writes it, even when the caller drops its references early. `wait` makes the side
  stream wait for NCCL's and the compute stream for the side stream; no host sync at all. Without
  the first fence NCCL could send rows the compute stream has not finished writing; without
  the second the compute stream could read rows that have not arrived (tests/gpu holds a
  test for each).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class Pending:
    """One exchange in flight. `wait` returns once the received rows may be read by the
    caller's stream (CPU: once they are there)."""

    def __init__(self, work: dist.Work | None, stream: torch.cuda.Stream | None = None):
        self._work = work
        self._stream = stream

    def wait(self) -> None:
        if self._work is None:
            return
        if self._stream is None:
            self._work.wait()
        else:
            compute = torch.cuda.current_stream(self._stream.device)
            with torch.cuda.stream(self._stream):
                # Makes the side stream (current here) wait for NCCL's own stream: no host sync.
                self._work.wait()
            compute.wait_stream(self._stream)
        self._work = None


class Exchange:
    """All-to-all of rows over one process group (the ep ranks).

    `start(out, inp, out_splits, in_splits)` sends rows inp[sum(in_splits[:p]) : ...] to rank p
    and receives out_splits[p] rows from rank p into out, in rank order, and returns at once;
    `all_to_all` is `start(...).wait()`. Every rank of the group must start the same
    exchanges in the same order. Splits of None mean equal parts. Neither buffer may be
    touched by the caller between `start` and `wait`.
    """

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.size = dist.get_world_size(group)
        self._side_stream: torch.cuda.Stream | None = None

    def start(
        self,
        out: torch.Tensor,
        inp: torch.Tensor,
        out_splits: list[int] | None = None,
        in_splits: list[int] | None = None,
    ) -> Pending:
        if not out.is_contiguous() or not inp.is_contiguous():
            raise ValueError("Exchange.start needs contiguous buffers (gloo and NCCL read them as flat memory)")
        if not inp.is_cuda:
            work = dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group, async_op=True)
            return Pending(work)
        side = self._stream_for(inp.device)
        side.wait_stream(torch.cuda.current_stream(inp.device))
        with torch.cuda.stream(side):
            work = dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group, async_op=True)
        inp.record_stream(side)
        out.record_stream(side)
        return Pending(work, side)

    def all_to_all(
        self,
        out: torch.Tensor,
        inp: torch.Tensor,
        out_splits: list[int] | None = None,
        in_splits: list[int] | None = None,
    ) -> None:
        self.start(out, inp, out_splits, in_splits).wait()

    def _stream_for(self, device: torch.device) -> torch.cuda.Stream:
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(device=device)
        return self._side_stream
