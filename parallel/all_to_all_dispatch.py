"""The all-to-all dispatcher: each assignment sent to the ep rank holding its expert, waited for at once.

Shape legend: T tokens on this rank, D model dim, E routed experts (all ranks), P ep ranks,
L = E / P experts on this rank, k experts per token, A = T * k assignments, N rows this rank
sends (its kept assignments), M rows this rank receives.

ep rank p holds experts [p * L, (p + 1) * L) (see parallel/expert_parallel.py). Per MoE layer,
every rank:

    routes its own tokens over all E experts (the router is replicated, like any dense layer)
    -> sorts its assignments by expert (LocalDispatcher: stable, capacity applied here, per rank),
       which also sorts them by destination rank
    -> exchanges per-expert counts (one all-to-all), then the rows (uneven all-to-all)
    -> regroups the received rows, which come source-rank-major, by local expert
    -> computes the shared experts on its own tokens
    -> computes its L experts on the received rows, each scaled by its routing weight (which
       travels with it)
    and combine undoes the regroup and the exchange, then sums each token's rows (LocalDispatcher).

Every exchange goes through `parallel.exchange.Exchange`; this dispatcher waits for each one
as soon as it starts it (`OverlappedDispatcher` in overlapped_dispatch.py does not).

Gradients: the all-to-all's backward sends each row's gradient back to its source, so an
expert's weight gradient sums the contributions of every ep rank's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from sparsetron.model.config import ConfigError
from sparsetron.model.moe.dispatch import Dispatcher, LocalContext, LocalDispatcher, SharedFn
from sparsetron.model.moe.experts import GroupedExperts
from sparsetron.model.moe.router import RouterOutput
from sparsetron.parallel.exchange import Exchange


class _AllToAll(torch.autograd.Function):
    """Tensors exchanged row by row with the same uneven splits, all in flight together and
    waited for at once; the backward sends each row's gradient back the way it came (the same
    exchanges with the splits swapped)."""

    @staticmethod
    def forward(ctx, recv_splits, send_splits, exchange, *sent):
        ctx.recv_splits, ctx.send_splits, ctx.exchange = recv_splits, send_splits, exchange
        return _exchange_rows(exchange, sent, recv_splits, send_splits)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        return None, None, None, *_exchange_rows(ctx.exchange, grads, ctx.send_splits, ctx.recv_splits)


def _exchange_rows(
    exchange: Exchange, tensors, out_splits: list[int], in_splits: list[int]
) -> tuple[torch.Tensor, ...]:
    outs = tuple(t.new_empty(sum(out_splits), *t.shape[1:]) for t in tensors)
    pending = [exchange.start(out, t.contiguous(), out_splits, in_splits) for out, t in zip(outs, tensors, strict=True)]
    for p in pending:
        p.wait()
    return outs


class _Reorder(torch.autograd.Function):
    """Each tensor's rows taken in `order`; the backward gathers by `inverse` (order's inverse
    permutation), so both directions are gathers: free of atomics and bitwise reproducible."""

    @staticmethod
    def forward(ctx, order_M, inverse_M, *tensors):
        ctx.save_for_backward(inverse_M)
        return tuple(t.index_select(0, order_M) for t in tensors)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        (inverse_M,) = ctx.saved_tensors
        return None, None, *(g.index_select(0, inverse_M) for g in grads)


def expert_major_order(recv_PL: torch.Tensor, num_rows: int) -> torch.Tensor:
    """order_M such that x_recv[order_M] is grouped by local expert.

    The received rows are source-rank-major: rank 0's rows for local experts 0..L-1, then rank
    1's, ... (recv_PL[p, l] rows from rank p for expert l). The experts want expert-major
    order; within an expert the rows stay in (source rank, sender's order), so the result is
    the same whatever the exchange's timing.
    """
    P, L = recv_PL.shape
    counts_flat = recv_PL.reshape(-1)
    start_LP = (torch.cumsum(counts_flat, 0) - counts_flat).view(P, L).t().reshape(-1)
    counts_LP = recv_PL.t().reshape(-1)
    dest_start_LP = torch.cumsum(counts_LP, 0) - counts_LP
    shift_M = torch.repeat_interleave(start_LP - dest_start_LP, counts_LP, output_size=num_rows)
    return shift_M + torch.arange(num_rows, device=recv_PL.device)


@dataclass
class AllToAllContext:
    """What `AllToAllDispatcher.combine` needs to undo a dispatch."""

    local: LocalContext
    """The local sort by expert (undone last, with the sum over each token's rows)."""
    send_splits: list[int]
    """Rows this rank sent to each ep rank."""
    recv_splits: list[int]
    """Rows this rank received from each ep rank."""
    order_M: torch.Tensor
    """Received row feeding each expert-grouped row (see `expert_major_order`)."""
    inverse_M: torch.Tensor
    """Inverse permutation of order_M."""


class AllToAllDispatcher(Dispatcher):
    """Sends each assignment to the ep rank holding its expert and brings the results back.

    `dispatch` returns the rows this rank's L experts compute, grouped by local expert, and
    tokens_per_expert [L] for those experts only. Capacity (capacity_factor > 0) is applied
    per rank, before sending, with LocalDispatcher's rule over this rank's tokens: each rank
    caps what it sends to an expert at ceil(factor * T * k / E), which is what data
    parallelism without ep already computes. Dropless otherwise.

    Synchronises with the host once per dispatch (twice with capacity, whose local sort
    sizes its output): all_to_all_single needs the split sizes as Python ints. That, and the
    data-dependent shapes, keep dispatch and combine out of torch.compile graphs.
    """

    def __init__(
        self, num_experts: int, exchange: Exchange, capacity_factor: float = 0.0, drop_policy: str = "probability"
    ):
        self.num_experts = num_experts
        self.ep = exchange.size
        if num_experts % self.ep != 0:
            raise ConfigError(f"parallel.expert={self.ep} must divide the {num_experts} routed experts")
        self.num_local_experts = num_experts // self.ep
        self.exchange = exchange
        self.local = LocalDispatcher(num_experts, capacity_factor, drop_policy)

    def run(
        self, x_TD: torch.Tensor, routing: RouterOutput, experts: GroupedExperts, shared_fn: SharedFn
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Dispatch, shared experts, routed experts, combine: the shared experts come between the
        exchange and the routed experts, where an overlapped dispatcher computes them while the
        rows are in flight (this one's exchange has finished when `dispatch` returns)."""
        x_local_MD, weights_M, tokens_per_expert_L, ctx = self.dispatch(x_TD, routing.indices_Tk, routing.weights_Tk)
        shared_TD = shared_fn()
        y_TD = self.combine(experts(x_local_MD, tokens_per_expert_L, weights_M), ctx)
        return y_TD, shared_TD, self.dropped(ctx)

    @torch.compiler.disable
    def dispatch(
        self, x_TD: torch.Tensor, indices_Tk: torch.Tensor, weights_Tk: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AllToAllContext]:
        P, L = self.ep, self.num_local_experts
        # Sorted by global expert, hence by destination rank (rank p holds experts p*L..).
        x_sorted_ND, weights_sorted_N, sent_E, local_ctx = self.local.dispatch(x_TD, indices_Tk, weights_Tk)
        recv_PL = torch.empty_like(sent_E)
        self.exchange.all_to_all(recv_PL, sent_E)
        recv_PL = recv_PL.view(P, L)
        # The one host sync: split sizes must be Python ints.
        splits = torch.cat([sent_E.view(P, L).sum(dim=1), recv_PL.sum(dim=1)]).tolist()
        send_splits, recv_splits = splits[:P], splits[P:]
        # The routing weights travel with their rows: the experts apply them.
        received = _AllToAll.apply(recv_splits, send_splits, self.exchange, x_sorted_ND, weights_sorted_N)
        M = received[0].shape[0]
        order_M = expert_major_order(recv_PL, M)
        inverse_M = torch.empty_like(order_M)
        inverse_M[order_M] = torch.arange(M, device=order_M.device)
        x_local_MD, weights_M = _Reorder.apply(order_M, inverse_M, *received)
        ctx = AllToAllContext(local_ctx, send_splits, recv_splits, order_M, inverse_M)
        return x_local_MD, weights_M, recv_PL.sum(dim=0), ctx

    @torch.compiler.disable
    def combine(self, y_local_MD: torch.Tensor, ctx: AllToAllContext) -> torch.Tensor:
        (y_recv_MD,) = _Reorder.apply(ctx.inverse_M, ctx.order_M, y_local_MD)
        (y_sorted_ND,) = _AllToAll.apply(ctx.send_splits, ctx.recv_splits, self.exchange, y_recv_MD)
        return self.local.combine(y_sorted_ND, ctx.local)

    def dropped(self, ctx: AllToAllContext) -> torch.Tensor:
        """Assignments of this rank's tokens dropped for capacity, before sending (0-dim int64)."""
        return self.local.dropped(ctx.local)
