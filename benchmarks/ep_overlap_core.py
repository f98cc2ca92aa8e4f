"""What every part of benchmarks/ep_overlap.py shares: the MoE layer as one ep rank holds it, the
dispatchers compared, one timed step, and the fraction of communication hidden.

Shape legend: T tokens on a rank, D model dim, E routed experts, P ep ranks, L = E / P experts on
a rank, H expert hidden size, k experts per token.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from ep_overlap_links import BalancedRouter, LoopbackExchange

from sparsetron.model.config import ModelConfig, MoEConfig
from sparsetron.model.moe.experts import GroupedExperts
from sparsetron.model.moe.layer import MoE
from sparsetron.parallel.all_to_all_dispatch import AllToAllDispatcher
from sparsetron.parallel.exchange import Exchange
from sparsetron.parallel.overlapped_dispatch import OverlappedDispatcher

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PLAIN = "all-to-all"
NOCOMM = "no-comm (local copy)"


def dispatcher_kinds(chunks: list[int]) -> dict[str, Callable[[int, Exchange], object]]:
    """The dispatchers compared, by row name: each makes a dispatcher for E experts over an exchange.
    A new row is one line here."""
    kinds = {PLAIN: lambda E, ex: AllToAllDispatcher(E, ex)}
    for C in chunks:
        kinds[f"overlapped C={C}"] = lambda E, ex, C=C: OverlappedDispatcher(E, ex, C)
    return kinds


@dataclass
class Spec:
    """One benchmark shape (the issue's CPU MoE shape by default), per ep rank."""

    tokens: int = 4096
    dim: int = 256
    experts: int = 16
    """Routed experts at granularity 1 (E = experts x granularity)."""
    hidden: int = 128
    """Expert hidden size at granularity 1 (H = hidden / granularity)."""
    top_k: int = 4
    granularity: int = 1
    dtype: str = "fp32"
    device: str = "cpu"
    dispatch_dim: int = 0
    """moe.dispatch_dim when sparsetron's MoEConfig has it (0 = off)."""
    seed: int = 0

    @property
    def num_experts(self) -> int:
        return self.experts * self.granularity

    @property
    def k(self) -> int:
        return self.top_k * self.granularity

    @property
    def expert_hidden(self) -> int:
        return self.hidden // self.granularity

    def check(self, eps: list[int]) -> None:
        """Refuse a shape the benchmark cannot run, naming the number at fault, before any work."""
        if self.hidden % self.granularity:
            raise ValueError(f"--granularity {self.granularity} must divide --hidden {self.hidden}")
        if self.k > self.num_experts:
            raise ValueError(f"--top-k x granularity = {self.k} exceeds the {self.num_experts} experts")
        for P in eps:
            if P < 1 or self.num_experts % P:
                raise ValueError(f"--eps {P} must be >= 1 and divide the {self.num_experts} routed experts")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: one of {', '.join(DTYPES)}")


def build_layer(spec: Spec, P: int, rank: int, exchange: Exchange, kind: Callable, balanced: bool) -> MoE:
    """The MoE layer as ep rank `rank` of P holds it: the replicated router, experts [rank * L, (rank +
    1) * L) of the one seeded set of E (what apply_ep's ExpertParallelExperts computes with), and the
    dispatcher `kind` over `exchange`. Every rank builds the same weights from the seed."""
    extra = {"dispatch_dim": spec.dispatch_dim} if spec.dispatch_dim else {}
    moe_cfg = MoEConfig(
        num_experts=spec.experts,
        top_k=spec.top_k,
        granularity=spec.granularity,
        expert_hidden=spec.expert_hidden,
        norm_topk_prob=True,
        **extra,
    )
    torch.manual_seed(spec.seed)
    layer = MoE(spec.dim, ModelConfig(dim=spec.dim, ffn_hidden=spec.hidden), moe_cfg)
    layer.init_weights(0.02, 0.02)
    whole = layer.experts
    L = spec.num_experts // P
    local = GroupedExperts(L, whole.dim, whole.hidden, whole.backend)
    with torch.no_grad():
        local.w13.copy_(whole.w13[rank * L : (rank + 1) * L])
        local.w2.copy_(whole.w2[rank * L : (rank + 1) * L])
    layer.experts = local
    if balanced:
        layer.router = BalancedRouter(layer.router)
    layer.dispatcher = kind(spec.num_experts, exchange)
    return layer.to(spec.device, DTYPES[spec.dtype])


def inputs(spec: Spec, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's tokens and the gradient its layer output receives (fresh, seeded per rank)."""
    g = torch.Generator().manual_seed(spec.seed * 1000 + rank + 1)
    x_TD = torch.randn(spec.tokens, spec.dim, generator=g)
    dy_TD = torch.randn(spec.tokens, spec.dim, generator=g) / spec.dim**0.5
    dtype = DTYPES[spec.dtype]
    return x_TD.to(spec.device, dtype).requires_grad_(True), dy_TD.to(spec.device, dtype)


def step(layer: MoE, x_TD: torch.Tensor, dy_TD: torch.Tensor) -> None:
    """Forward and backward of the layer, the input's gradient included (a layer inside a model has one)."""
    layer.zero_grad(set_to_none=True)
    x_TD.grad = None
    layer(x_TD).backward(dy_TD)


def variants(
    spec: Spec, P: int, rank: int, kinds: dict, balanced: bool, transport: Callable[[], Exchange]
) -> dict[str, tuple[MoE, Exchange]]:
    """The rows of one (P, routing) group, by name: no-comm (the plain dispatcher over a local copy),
    then every dispatcher of `kinds` over a fresh `transport()`; each with its layer and exchange."""
    rows = {}
    for name in [NOCOMM, *kinds]:
        exchange = LoopbackExchange(P, rank) if name == NOCOMM else transport()
        rows[name] = build_layer(spec, P, rank, exchange, kinds[PLAIN if name == NOCOMM else name], balanced), exchange
    return rows


def interleaved_steps(
    rows: dict[str, tuple[MoE, Exchange]],
    x_TD: torch.Tensor,
    dy_TD: torch.Tensor,
    reps: int,
    warmup: int,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, list[float]]:
    """Milliseconds of `reps` steps of each row after `warmup` untimed ones, the rows taking turns
    step by step: a load that comes and goes on a shared machine then falls on every row alike.
    `sync` runs before and after each timed step (a barrier across ranks, a device sync)."""
    times: dict[str, list[float]] = {name: [] for name in rows}
    for i in range(warmup + reps):
        for name, (layer, _) in rows.items():
            sync()
            start = time.perf_counter()
            step(layer, x_TD, dy_TD)
            sync()
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def fraction_hidden(t_overlap: float, t_plain: float, t_nocomm: float) -> float:
    """1 - (T_overlap - T_nocomm) / (T_plain - T_nocomm): the share of the plain dispatcher's
    communication time that the overlapped one does not add to the step. NaN when the plain step is
    not slower than the no-comm step (nothing to hide was measured)."""
    exposed = t_plain - t_nocomm
    return 1.0 - (t_overlap - t_nocomm) / exposed if exposed > 0 else float("nan")


def pct(value: float | None) -> str:
    """A fraction as a table cell: "—" for none, "n/a" for NaN (nothing to hide was measured)."""
    if value is None:
        return "—"
    return "n/a" if value != value else f"{100 * value:.0f}%"


def analytic_bytes_per_token(k: int, width: int, element_bytes: int, P: int) -> tuple[int, float]:
    """(all rows exchanged, rows leaving the rank) per token per layer: k rows of `width` numbers, moved
    four times (dispatch and combine, forward and backward), and k fp32 routing weights, moved twice
    (with the dispatch, and their gradients back); under balanced routing (P - 1) / P of them go to
    another rank."""
    total = k * (4 * width * element_bytes + 2 * 4)
    return total, total * (P - 1) / P
