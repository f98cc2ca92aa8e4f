"""Dispatchers: move each (token, slot) assignment to its expert and bring the results back.

Shape legend: T tokens, D model dim, E experts, k experts per token, A = T * k assignments
(assignment a = t * k + j is token t's j-th choice), N assignments kept (N = A when dropless).

A dispatcher owns all data movement of the MoE layer and its order: the layer routes, then
hands the tokens, the routing, the routed experts and a callable for the shared experts to `run`,
which decides when each runs. So all-to-all and overlapped variants replace `LocalDispatcher`
without touching the router, the experts or the layer. Both directions are gathers with an
exact inverse or a sum in a fixed order, so forward and backward are free of atomics and
bitwise reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from sparsetron.model.moe.experts import GroupedExperts
from sparsetron.model.moe.router import RouterOutput

SharedFn = Callable[[], torch.Tensor | None]
"""shared_fn() -> the shared experts' output on the layer's input (gate applied), or None without shared experts."""


class Dispatcher:
    """Interface. `run` is what the MoE layer calls; `dispatch`, `combine` and `dropped` are its
    steps: `dispatch` groups tokens by expert, `combine` undoes it and mixes by weight."""

    def run(
        self, x_TD: torch.Tensor, routing: RouterOutput, experts: GroupedExperts, shared_fn: SharedFn
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Returns (y_TD [T, D], shared, dropped): the routed experts' weighted output, what
        `shared_fn` returned, and the assignments dropped for capacity (0-dim int64, see
        `dropped`). The layer adds the two outputs; x_TD is what the experts take (the layer's
        input, or a projection of it).

        Sequenced here as dispatch, routed experts, combine, then shared experts: on one device
        nothing is in flight to hide work behind. A dispatcher that exchanges tokens overrides
        this to compute the shared experts while its exchange is under way.
        """
        x_perm, tokens_per_expert, ctx = self.dispatch(x_TD, routing.indices_Tk, routing.weights_Tk)
        y_TD = self.combine(experts(x_perm, tokens_per_expert), ctx)
        return y_TD, shared_fn(), self.dropped(ctx)

    def dispatch(
        self, x_TD: torch.Tensor, indices_Tk: torch.Tensor, weights_Tk: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, object]:
        """Returns (x_perm [N, D] grouped by expert, tokens_per_expert int64, ctx for combine).

        tokens_per_expert counts the rows of x_perm for each expert whose weights this rank
        holds, in order: all E on one device, a slice under expert parallelism.
        """
        raise NotImplementedError

    def combine(self, y_perm: torch.Tensor, ctx: object) -> torch.Tensor:
        """y_TD [T, D] = sum over kept slots j of weight[t, j] * y_perm[row of (t, j)], in y_perm's dtype."""
        raise NotImplementedError

    def dropped(self, ctx: object) -> torch.Tensor:
        """0-dim int64: the assignments of this rank's tokens that `dispatch` dropped for capacity."""
        raise NotImplementedError


@dataclass
class LocalContext:
    """What `LocalDispatcher.combine` needs to undo a dispatch."""

    perm_N: torch.Tensor
    """Assignment held by each row of x_perm."""
    token_N: torch.Tensor
    """Token of each row of x_perm (perm_N // k)."""
    slot_kT: torch.Tensor
    """[k, T]: row of x_perm holding token t's j-th assignment; N (past the end) for a dropped one."""
    weights_Tk: torch.Tensor
    """Routing weights (fp32), dropped or not."""
    dropless: bool
    """No assignment was dropped by rule (no capacity): every slot names a real row."""
    dropped: torch.Tensor
    """0-dim int64: assignments dropped for capacity."""


def _accumulation_dtype(rows: torch.Tensor, weights: torch.Tensor | None) -> torch.dtype:
    """fp32, or wider where the rows or weights are: bf16 rows are summed and weighted in fp32."""
    dtype = torch.promote_types(rows.dtype, torch.float32)
    return dtype if weights is None else torch.promote_types(dtype, weights.dtype)


def _sum_slots(rows_ND: torch.Tensor, slot_kT: torch.Tensor, dropless: bool, weights_kT=None) -> torch.Tensor:
    """[T, D]: sum over j of (weights_kT[j] *) rows[slot_kT[j]], accumulated in fp32 or wider, in rows' dtype.

    One [T, D] gather per slot, added in slot order: a fixed order on every device, with no
    atomics (index_add_ in expert order is atomic, hence unordered, on CUDA), and no [T, k, D]
    intermediate. Slot N is a zero row, which only capacity dispatch points at, so only it pays
    for the padded copy.
    """
    if not dropless:
        rows_ND = torch.cat([rows_ND, rows_ND.new_zeros(1, rows_ND.shape[1])])
    acc_dtype = _accumulation_dtype(rows_ND, weights_kT)
    if weights_kT is not None:
        weights_kT = weights_kT.to(acc_dtype).unsqueeze(-1)
    # index_select returns a fresh tensor, so .to() of the same dtype leaves one we may write into.
    acc_TD = rows_ND.index_select(0, slot_kT[0]).to(acc_dtype)
    if weights_kT is not None:
        acc_TD.mul_(weights_kT[0])
    for j in range(1, slot_kT.shape[0]):
        rows_TD = rows_ND.index_select(0, slot_kT[j])
        if weights_kT is None:
            acc_TD.add_(rows_TD)
        else:
            # Product rounded, then added (not a fused addcmul_): the rounding of the [T, k, D]
            # formula it replaces, so fp32 training reproduces its loss curve bit for bit.
            acc_TD.add_(rows_TD * weights_kT[j])
    return acc_TD.to(rows_ND.dtype)


class _GatherTokens(torch.autograd.Function):
    """x_perm = x[token of each kept assignment]; backward sums each token's k row gradients."""

    @staticmethod
    def forward(ctx, x_TD, token_N, slot_kT, dropless):
        ctx.save_for_backward(slot_kT)
        ctx.dropless = dropless
        return x_TD.index_select(0, token_N)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ND):
        (slot_kT,) = ctx.saved_tensors
        return _sum_slots(grad_ND, slot_kT, ctx.dropless), None, None, None


class _Combine(torch.autograd.Function):
    """y_TD[t] = sum_j weights[t, j] * y_perm[slot of (t, j)] (zero for a dropped slot).

    The backward works in expert order, on the rows as they are: the output gradient is
    gathered once to the rows' tokens, giving both the rows' gradient (scaled by their weight)
    and the weights' gradient (its dot product with each row), so nothing of size [T, k, D]
    is saved or made.
    """

    @staticmethod
    def forward(ctx, y_ND, weights_Tk, perm_N, token_N, slot_kT, dropless):
        ctx.save_for_backward(y_ND, weights_Tk, perm_N, token_N)
        return _sum_slots(y_ND, slot_kT, dropless, weights_Tk.t())

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_TD):
        y_ND, weights_Tk, perm_N, token_N = ctx.saved_tensors
        acc_dtype = _accumulation_dtype(y_ND, weights_Tk)
        grad_ND = grad_TD.index_select(0, token_N).to(acc_dtype)
        grad_weights_Tk = None
        if ctx.needs_input_grad[1]:
            grad_weights_A = weights_Tk.new_zeros(weights_Tk.numel())
            grad_weights_A[perm_N] = torch.linalg.vecdot(grad_ND, y_ND.to(acc_dtype)).to(weights_Tk.dtype)
            grad_weights_Tk = grad_weights_A.view_as(weights_Tk)
        weights_N = weights_Tk.reshape(-1).index_select(0, perm_N).to(acc_dtype)
        grad_y_ND = grad_ND.mul_(weights_N.unsqueeze(-1)).to(y_ND.dtype)
        return grad_y_ND, grad_weights_Tk, None, None, None, None


def _rank_within_expert(expert_A: torch.Tensor, order_A: torch.Tensor, num_experts: int) -> torch.Tensor:
    """For assignments visited in `order_A` (already grouped by expert), each one's position within its expert."""
    sorted_expert_A = expert_A.index_select(0, order_A)
    first_E = torch.searchsorted(sorted_expert_A, torch.arange(num_experts, device=expert_A.device))
    rank_sorted_A = torch.arange(expert_A.numel(), device=expert_A.device) - first_E.index_select(0, sorted_expert_A)
    rank_A = torch.empty_like(rank_sorted_A)
    rank_A[order_A] = rank_sorted_A
    return rank_A


class LocalDispatcher(Dispatcher):
    """Sort-based permute on one device, with an optional capacity limit.

    Rows of x_perm are grouped by expert; within an expert they keep token order (stable
    sort), so results do not depend on the sort's implementation.

    capacity_factor > 0 caps every expert at ceil(factor * T * k / E) assignments. Over
    capacity, policy "probability" keeps the highest-weight assignments (ties: earlier
    assignment first), "position" keeps the earliest (token t before t+1, slot j before j+1).
    A dropped assignment contributes zero to its token's output, and the token's remaining
    weights are not renormalised (as in Switch / GShard). Dropless dispatch never synchronises
    with the device; capacity dispatch synchronises once to size x_perm.
    """

    def __init__(self, num_experts: int, capacity_factor: float = 0.0, drop_policy: str = "probability"):
        if drop_policy not in ("probability", "position"):
            raise ValueError(f"moe.drop_policy must be 'probability' or 'position', got {drop_policy!r}")
        if capacity_factor < 0:
            raise ValueError(f"moe.capacity_factor must be >= 0, got {capacity_factor}")
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.drop_policy = drop_policy

    def capacity(self, num_tokens: int, top_k: int) -> int:
        """Most assignments one expert takes; only meaningful with capacity_factor > 0."""
        return math.ceil(self.capacity_factor * num_tokens * top_k / self.num_experts)

    def keep_mask(self, indices_Tk: torch.Tensor, weights_Tk: torch.Tensor) -> torch.Tensor:
        """Which assignments survive the capacity limit, [T, k] bool (all True when dropless)."""
        T, k = indices_Tk.shape
        if self.capacity_factor <= 0:
            return torch.ones_like(indices_Tk, dtype=torch.bool)
        expert_A = indices_Tk.reshape(-1)
        if self.drop_policy == "probability":
            priority_A = torch.argsort(weights_Tk.detach().reshape(-1), descending=True, stable=True)
            order_A = priority_A.index_select(0, torch.argsort(expert_A.index_select(0, priority_A), stable=True))
        else:
            order_A = torch.argsort(expert_A, stable=True)
        rank_A = _rank_within_expert(expert_A, order_A, self.num_experts)
        return (rank_A < self.capacity(T, k)).view(T, k)

    def dispatch(
        self, x_TD: torch.Tensor, indices_Tk: torch.Tensor, weights_Tk: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, LocalContext]:
        return self.dispatch_by(x_TD, indices_Tk.reshape(-1), self.num_experts, indices_Tk, weights_Tk)

    def dispatch_by(
        self,
        x_TD: torch.Tensor,
        bucket_A: torch.Tensor,
        num_buckets: int,
        indices_Tk: torch.Tensor,
        weights_Tk: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, LocalContext]:
        """`dispatch` with rows grouped by `bucket_A` (one of num_buckets per assignment, in an
        order that groups each expert's rows) instead of by expert: the expert itself, or
        (chunk of tokens, expert) for a dispatcher that sends chunks one after another.
        Returns (x_perm, rows per bucket [num_buckets], ctx); capacity is applied per expert
        over all T tokens, whatever the buckets."""
        T, k = indices_Tk.shape
        A = T * k
        if self.capacity_factor > 0:
            keep_A = self.keep_mask(indices_Tk, weights_Tk).reshape(-1)
            # Dropped assignments sort into a pseudo-bucket past the end and are cut off.
            bucket_A = torch.where(keep_A, bucket_A, num_buckets)
        order_A = torch.argsort(bucket_A, stable=True)
        bounds = torch.searchsorted(
            bucket_A.index_select(0, order_A),
            torch.arange(num_buckets + 1, device=bucket_A.device, dtype=bucket_A.dtype),
        )
        rows_per_bucket = bounds.diff()
        N = int(bounds[num_buckets]) if self.capacity_factor > 0 else A
        slot_A = torch.empty_like(order_A)
        slot_A[order_A] = torch.arange(A, device=order_A.device)
        # Rows N.. of the sort are the dropped assignments; point them all at the zero row N.
        slot_kT = slot_A.clamp_max(N).view(T, k).t().contiguous()
        perm_N = order_A[:N]
        token_N = torch.div(perm_N, k, rounding_mode="floor")
        dropless = self.capacity_factor <= 0
        x_perm_ND = _GatherTokens.apply(x_TD, token_N, slot_kT, dropless)
        ctx = LocalContext(
            perm_N=perm_N,
            token_N=token_N,
            slot_kT=slot_kT,
            weights_Tk=weights_Tk,
            dropless=dropless,
            dropped=A - bounds[num_buckets],
        )
        return x_perm_ND, rows_per_bucket, ctx

    def dropped(self, ctx: LocalContext) -> torch.Tensor:
        return ctx.dropped

    def combine(self, y_perm_ND: torch.Tensor, ctx: LocalContext) -> torch.Tensor:
        # Mixed in fp32 (or wider) so bf16 outputs are weighted with the router's full precision.
        return _Combine.apply(y_perm_ND, ctx.weights_Tk, ctx.perm_N, ctx.token_N, ctx.slot_kT, ctx.dropless)
