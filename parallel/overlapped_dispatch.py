"""The overlapped dispatcher: tokens go to the expert ranks in C chunks, each chunk's exchange in
flight while another chunk's experts compute (the idea of Comet, arXiv 2502.19811, at the
granularity of whole chunks).

Shape legend: T tokens on this rank, D width of the dispatched rows, E routed experts, P ep
ranks, L = E / P experts on this rank, C chunks, k experts per token, N rows this rank sends,
M rows it receives, H expert hidden size, H2 = 2H; a suffix _c is one chunk's part.

Chunk c holds tokens [c * ceil(T / C), (c + 1) * ceil(T / C)) (empty chunks are fine: C may
exceed T). Per MoE layer, forward:

    sort this rank's assignments by (chunk, expert)          (capacity per expert over all T, as
                                                              the plain dispatcher applies it)
    exchange the rows per chunk and expert, [P, C, L], in ONE all-to-all; ONE host sync
    start the C row exchanges (each row's routing weight      (in flight from here on)
    travels beside it)
    shared experts                                            (while chunk 0 travels)
    for each chunk c: wait for it, experts on it (weighted), start its return exchange
                                                              (chunk c + 1 arrives meanwhile,
                                                               chunk c - 1 returns meanwhile)
    wait for the returns, sum each token's rows               (LocalDispatcher.combine)

and the backward mirrors it: the C gradient exchanges start at once; for each chunk, the
expert backward of its input and routing weights (`grouped_swiglu_backward_dx`) then their
return exchanges start, and its weight gradients (`grouped_swiglu_backward_dw`, summed over chunks in fp32)
compute while that return travels; the shared experts' backward runs while the last returns
travel. That is why the experts run here through the explicit grouped SwiGLU functions and not
through autograd: autograd would run the whole experts' backward as one node after one
blocking exchange.

Two autograd Functions carry it, with the shared experts' ordinary autograd between them:
`_SendChunks` (starts the exchanges; its backward waits for the returning input gradients)
and `_ExpertsOnChunks` (experts and returns; its backward does the per-chunk work above),
which runs inside the experts module's own call (GroupedExperts' `compute` hook), so that FSDP
unshards the expert weights for it and reduces their gradients once its backward is done.
The engine runs a later-created node's backward first, so the order above holds in the
backward too. They share an `_InFlight` record for what is in flight between them; what the
backward needs is saved with `save_for_backward`, so activation checkpointing frees and
recomputes it like any other activation (the recompute exchanges again, on every rank alike).

Results equal the plain all-to-all dispatcher's, rows in the same order within each expert;
only the weight gradients sum their chunks in another order (not bitwise, within rounding; one
chunk is bitwise the plain dispatcher). In bf16 each chunk's weight gradient leaves its GEMM
rounded to bf16 before the fp32 sum, so that rounding is paid C + 1 times instead of once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import torch
from torch.autograd.function import once_differentiable

from sparsetron.kernels.grouped_mm import (
    grouped_swiglu_backward_dw,
    grouped_swiglu_backward_dx,
    grouped_swiglu_forward,
    resolve_swiglu_backend,
)
from sparsetron.model.moe.experts import GroupedExperts
from sparsetron.model.moe.router import RouterOutput
from sparsetron.parallel.all_to_all_dispatch import AllToAllDispatcher, expert_major_order
from sparsetron.parallel.exchange import Exchange, Pending


@dataclass
class _Chunk:
    """Where chunk c's rows lie on both sides of its exchanges."""

    send_splits: list[int]
    """Rows of this chunk this rank sends to each ep rank."""
    recv_splits: list[int]
    """Rows of this chunk this rank receives from each ep rank."""
    sent: slice
    """Its rows in the sorted send buffer [N, D]."""
    received: slice
    """Its rows in the receive buffer [M, D]."""
    order: torch.Tensor
    """Received row feeding each expert-grouped row of this chunk (`expert_major_order`)."""
    inverse: torch.Tensor
    """Inverse permutation of order."""
    offsets: torch.Tensor
    """[L] int32: cumulative rows per local expert, expert-grouped."""


def _plan(counts_CPL: torch.Tensor, recv_CPL: torch.Tensor) -> list[_Chunk]:
    """Per chunk, the splits (from the one host sync) and the regrouping of the received rows."""
    C, P, _ = counts_CPL.shape
    # The one host sync of the layer: every chunk's split sizes at once.
    splits = torch.stack([counts_CPL.sum(dim=2), recv_CPL.sum(dim=2)]).tolist()
    chunks, sent_start, recv_start = [], 0, 0
    for c in range(C):
        send_splits, recv_splits = splits[0][c], splits[1][c]
        n_c, m_c = sum(send_splits), sum(recv_splits)
        order = expert_major_order(recv_CPL[c], m_c)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(m_c, device=order.device)
        offsets = torch.cumsum(recv_CPL[c].sum(dim=0), dim=0).to(torch.int32)
        chunks.append(
            _Chunk(
                send_splits,
                recv_splits,
                slice(sent_start, sent_start + n_c),
                slice(recv_start, recv_start + m_c),
                order,
                inverse,
                offsets,
            )
        )
        sent_start, recv_start = sent_start + n_c, recv_start + m_c
    return chunks


@dataclass
class _InFlight:
    """What travels between the two Functions of one layer call (never saved tensors)."""

    exchange: Exchange
    chunks: list[_Chunk]
    received: tuple[torch.Tensor, torch.Tensor] | None = None
    """Forward: the receive buffers, rows [M, D] and their routing weights [M], filled by
    `arrivals` (dropped once consumed)."""
    arrivals: list[list[Pending]] = field(default_factory=list)
    """Forward: chunk c's exchanges of rows and weights."""
    input_grad: tuple[torch.Tensor, torch.Tensor] | None = None
    """Backward: the gradients of the sorted rows [N, D] and their weights [N], filled by `returns`."""
    returns: list[list[Pending]] = field(default_factory=list)
    """Backward: chunk c's exchanges of those gradients."""


def _start_all(exchange: Exchange, outs, ins, out_splits: list[int], in_splits: list[int]) -> list[Pending]:
    return [exchange.start(out, inp, out_splits, in_splits) for out, inp in zip(outs, ins, strict=True)]


def _wait_all(pending: list[Pending]) -> None:
    for p in pending:
        p.wait()


class _SendChunks(torch.autograd.Function):
    """Starts every chunk's exchanges of rows and routing weights and returns a token that
    orders `_ExpertsOnChunks` after it; the backward waits for the gradients
    `_ExpertsOnChunks.backward` sent back."""

    @staticmethod
    def forward(ctx, x_sorted_ND, weights_sorted_N, flight: _InFlight):
        ctx.flight = flight
        M = flight.chunks[-1].received.stop
        flight.received = (x_sorted_ND.new_empty(M, x_sorted_ND.shape[1]), weights_sorted_N.new_empty(M))
        flight.arrivals = [
            _start_all(
                flight.exchange,
                [buffer[chunk.received] for buffer in flight.received],
                (x_sorted_ND[chunk.sent], weights_sorted_N[chunk.sent]),
                chunk.recv_splits,
                chunk.send_splits,
            )
            for chunk in flight.chunks
        ]
        return x_sorted_ND.new_zeros(())

    @staticmethod
    @once_differentiable
    def backward(ctx, _grad_token):
        flight = ctx.flight
        for pending in flight.returns:
            _wait_all(pending)
        input_grad, flight.input_grad, flight.returns = flight.input_grad, None, []
        return *input_grad, None


class _ExpertsOnChunks(torch.autograd.Function):
    """Experts on each chunk as it arrives, each chunk's output sent back at once; returns the
    sorted rows' outputs [N, D] once every return has arrived."""

    @staticmethod
    def forward(ctx, token, w13_LDH2, w2_LHD, flight: _InFlight, backend: str):
        (received_MD, received_weights_M), flight.received = flight.received, None
        arrivals, flight.arrivals = flight.arrivals, []
        N, M = flight.chunks[-1].sent.stop, received_MD.shape[0]
        # Rows travel in the layer input's dtype and compute in the weights' (autocast's), as
        # they would with the plain dispatcher and grouped_swiglu.
        compute_dtype = w13_LDH2.dtype
        y_sorted_ND = received_MD.new_empty(N, received_MD.shape[1], dtype=compute_dtype)
        x_local_MD = received_MD.new_empty(M, received_MD.shape[1], dtype=compute_dtype)
        weights_local_M = torch.empty_like(received_weights_M)
        h13_per_chunk, returns = [], []
        for chunk, arrival in zip(flight.chunks, arrivals, strict=True):
            _wait_all(arrival)
            x_local_mD = x_local_MD[chunk.received]
            if received_MD.dtype == compute_dtype:
                torch.index_select(received_MD[chunk.received], 0, chunk.order, out=x_local_mD)
            else:
                x_local_mD.copy_(received_MD[chunk.received].index_select(0, chunk.order))
            weights_m = weights_local_M[chunk.received]
            torch.index_select(received_weights_M[chunk.received], 0, chunk.order, out=weights_m)
            y_local_mD, h13_mH2 = grouped_swiglu_forward(
                x_local_mD, w13_LDH2, w2_LHD, chunk.offsets, backend, weights_m
            )
            h13_per_chunk.append(h13_mH2)
            y_recv_mD = y_local_mD.index_select(0, chunk.inverse)
            returns.append(
                flight.exchange.start(y_sorted_ND[chunk.sent], y_recv_mD, chunk.send_splits, chunk.recv_splits)
            )
        for pending in returns:
            pending.wait()
        ctx.input_dtype, ctx.token_dtype = received_MD.dtype, token.dtype
        ctx.save_for_backward(x_local_MD, weights_local_M, w13_LDH2, w2_LHD, *h13_per_chunk)
        ctx.flight, ctx.backend = flight, backend
        return y_sorted_ND

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y_sorted_ND):
        x_local_MD, weights_local_M, w13_LDH2, w2_LHD, *h13_per_chunk = ctx.saved_tensors
        flight, backend = ctx.flight, ctx.backend
        grad_y_sorted_ND = grad_y_sorted_ND.contiguous()
        grad_recv_MD = torch.empty_like(x_local_MD)
        arrivals = [
            flight.exchange.start(
                grad_recv_MD[chunk.received], grad_y_sorted_ND[chunk.sent], chunk.recv_splits, chunk.send_splits
            )
            for chunk in flight.chunks
        ]
        N = grad_y_sorted_ND.shape[0]
        flight.input_grad = (
            torch.empty_like(grad_y_sorted_ND, dtype=ctx.input_dtype),
            weights_local_M.new_empty(N),
        )
        # Chunks' weight gradients add up in fp32 (or wider), rounded to the weights' dtype once.
        acc_dtype = torch.promote_types(w13_LDH2.dtype, torch.float32)
        dw13_LDH2 = torch.zeros_like(w13_LDH2, dtype=acc_dtype)
        dw2_LHD = torch.zeros_like(w2_LHD, dtype=acc_dtype)
        for chunk, arrival, h13_mH2 in zip(flight.chunks, arrivals, h13_per_chunk, strict=True):
            arrival.wait()
            dy_mD = grad_recv_MD[chunk.received].index_select(0, chunk.order)
            x_mD, weights_m = x_local_MD[chunk.received], weights_local_M[chunk.received]
            dx_mD, dh13_mH2, dweights_m = grouped_swiglu_backward_dx(
                dy_mD, x_mD, h13_mH2, w13_LDH2, w2_LHD, chunk.offsets, backend, weights_m
            )
            flight.returns.append(
                _start_all(
                    flight.exchange,
                    [buffer[chunk.sent] for buffer in flight.input_grad],
                    (
                        dx_mD.index_select(0, chunk.inverse).to(ctx.input_dtype),
                        dweights_m.index_select(0, chunk.inverse),
                    ),
                    chunk.send_splits,
                    chunk.recv_splits,
                )
            )
            dw13_c, dw2_c = grouped_swiglu_backward_dw(
                dy_mD, x_mD, h13_mH2, dh13_mH2, chunk.offsets, backend, weights_m
            )
            dw13_LDH2 += dw13_c
            dw2_LHD += dw2_c
        # A zero for the token (not None): FSDP's post-backward hook on the experts' input fires on it.
        grad_token = grad_y_sorted_ND.new_zeros((), dtype=ctx.token_dtype)
        return grad_token, dw13_LDH2.to(w13_LDH2.dtype), dw2_LHD.to(w2_LHD.dtype), None, None


class OverlappedDispatcher(AllToAllDispatcher):
    """The all-to-all dispatcher with its exchanges split into `chunks` and overlapped with the
    expert and shared-expert compute (module docstring). Capacity, drop policy and the rows
    each expert sees are the plain dispatcher's; `dispatch`/`combine` (the unchunked steps)
    are inherited and unused by `run`.

    Synchronises with the host once per layer call (twice with capacity, whose local sort
    sizes its output), however many chunks: the [P, C, L] counts travel in one exchange.
    """

    def __init__(
        self,
        num_experts: int,
        exchange: Exchange,
        chunks: int,
        capacity_factor: float = 0.0,
        drop_policy: str = "probability",
    ):
        super().__init__(num_experts, exchange, capacity_factor, drop_policy)
        if chunks < 1:
            raise ValueError(f"moe.overlap_chunks must be >= 1, got {chunks}")
        self.chunks = chunks

    def run(self, x_TD, routing: RouterOutput, experts: GroupedExperts, shared_fn):
        x_sorted_ND, weights_sorted_N, local_ctx, flight = self._send(x_TD, routing)
        token = _SendChunks.apply(x_sorted_ND, weights_sorted_N, flight)
        # Between the two: the shared experts compute while chunk 0 travels (and, in the
        # backward, while the last input gradients return).
        shared_TD = shared_fn()
        # Through the module's own call, so that FSDP unshards its weights for it and reduces
        # their gradients after its backward.
        y_sorted_ND = experts(token, compute=partial(self._experts_on_chunks, flight=flight, backend=experts.backend))
        return self._combine(y_sorted_ND, local_ctx), shared_TD, self.local.dropped(local_ctx)

    @torch.compiler.disable
    def _send(self, x_TD: torch.Tensor, routing: RouterOutput):
        """Sort by (chunk, expert), exchange the counts, plan the chunks."""
        indices_Tk = routing.indices_Tk
        T, k = indices_Tk.shape
        C, P, L, E = self.chunks, self.ep, self.num_local_experts, self.num_experts
        chunk_T = torch.arange(T, device=indices_Tk.device) // max(math.ceil(T / C), 1)
        bucket_A = (chunk_T.unsqueeze(1) * E + indices_Tk).reshape(-1)
        x_sorted_ND, weights_sorted_N, counts_CE, local_ctx = self.local.dispatch_by(
            x_TD, bucket_A, C * E, indices_Tk, routing.weights_Tk
        )
        # Rows for each destination rank, chunk and expert there: [P, C, L] in rank order.
        counts_PCL = counts_CE.view(C, P, L).transpose(0, 1).contiguous()
        recv_PCL = torch.empty_like(counts_PCL)
        self.exchange.all_to_all(recv_PCL, counts_PCL)
        chunks = _plan(counts_PCL.transpose(0, 1), recv_PCL.transpose(0, 1))
        return x_sorted_ND, weights_sorted_N, local_ctx, _InFlight(self.exchange, chunks)

    @staticmethod
    @torch.compiler.disable
    def _experts_on_chunks(token, w13_LDH2, w2_LHD, flight: _InFlight, backend: str) -> torch.Tensor:
        """The experts' compute (GroupedExperts' `compute` hook): weights in autocast's dtype,
        as grouped_swiglu would cast them, then the chunks."""
        device_type = token.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            w13_LDH2, w2_LHD = w13_LDH2.to(dtype), w2_LHD.to(dtype)
        # Chosen for rows as the experts see them: contiguous, in the weights' dtype.
        rows_like = token.new_empty(1, w13_LDH2.shape[1], dtype=w13_LDH2.dtype)
        backend = resolve_swiglu_backend(rows_like, w13_LDH2, w2_LHD, backend)
        with torch.autocast(device_type, enabled=False):
            return _ExpertsOnChunks.apply(token, w13_LDH2, w2_LHD, flight, backend)

    @torch.compiler.disable
    def _combine(self, y_sorted_ND: torch.Tensor, local_ctx) -> torch.Tensor:
        return self.local.combine(y_sorted_ND, local_ctx)
