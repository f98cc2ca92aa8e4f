"""The MoE layer: route, then the dispatcher runs dispatch -> compute -> combine and the shared experts.

Shape legend: B batch, S sequence, T = B * S tokens, D model dim, E routed experts,
k experts per token, N rows sent to the experts, R the rows' width the experts take
(moe.dispatch_dim, else D).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparsetron.model.config import ConfigError, ModelConfig, MoEConfig
from sparsetron.model.layers import AttachLoss, FeedForward
from sparsetron.model.moe.balancing import Reducer, TokenSplit, expert_counts, load_balancing_loss, router_z_loss
from sparsetron.model.moe.dispatch import Dispatcher, LocalDispatcher
from sparsetron.model.moe.experts import GroupedExperts
from sparsetron.model.moe.router import Router
from sparsetron.model.sigma_reparam import linear


@dataclass
class MoEStats:
    """What one forward of a MoE layer saw (`MoE.last_stats`), or one optimizer step
    (`MoE.step_stats`), detached; read by the balancing helpers and metrics."""

    tokens_per_expert: torch.Tensor
    """[E] int64: assignments each expert was routed, before any capacity drop (a step: summed)."""
    aux_loss: torch.Tensor | float
    """The load-balancing loss added (coefficient included); 0.0 when off (a step: mean over micro-batches)."""
    z_loss: torch.Tensor | float
    """The router z-loss added (coefficient included); 0.0 when off (a step: mean over micro-batches)."""
    dropped_tokens: torch.Tensor
    """Assignments dropped for capacity (0-dim int64; a step: summed)."""
    accumulated: bool = False
    """Set by `accumulate_stats` once these numbers are in the step accumulators."""
    micro_batches: int = 1
    """Forwards these numbers cover: 1 for a forward, the micro-batches accumulated for a step."""


class MoE(nn.Module):
    """Fine-grained mixture of experts with optional shared experts (see shared/specs/moe.md).

    forward(x_BSD, route_BSD=None) -> y_BSD: the experts compute on x_BSD; the router reads
    route_BSD when given (moe.router_input=pre_attention: the block's normalised input, in x_BSD's
    shape and layout), else x_BSD. The auxiliary and z losses are attached to the graph (their
    gradient is `aux_loss_scale`, set by `balancing.set_aux_loss_scale`), not returned.
    `dispatcher` sequences dispatch, expert compute, shared experts and combine: a
    LocalDispatcher here unless moe.dispatcher names one that exchanges tokens between ranks
    (all_to_all, overlapped), which `parallel.apply_ep` installs. Set by the parallel code (None
    here): `count_reducer` sums the aux loss's expert counts over every rank holding other
    tokens when aux_loss_level is "global"; `token_split` says that this rank holds a part of
    every sequence (see balancing.TokenSplit).

    A training forward (module in training mode, gradients enabled) adds its statistics to
    the optimizer step's sums, so any number of forwards may run before their backwards (a
    pipeline schedule does); the re-run of this forward by activation checkpointing during
    the backward adds nothing.
    """

    def __init__(self, dim: int, model_cfg: ModelConfig, moe_cfg: MoEConfig):
        super().__init__()
        self.moe_cfg = moe_cfg
        self.dim = dim
        self.num_experts = moe_cfg.routed_experts
        self.top_k = moe_cfg.experts_per_token
        hidden = moe_cfg.hidden_size(model_cfg)
        reparam = model_cfg.sigma_reparam
        self.router = Router(dim, moe_cfg, sigma_reparam=reparam)
        # BigMac's descend-communicate-communicate-ascend (README, "Low-dimension dispatch"): one
        # projection shared by all experts, so the dispatcher moves R numbers per token, not D.
        r = moe_cfg.dispatch_dim
        self.dispatch_down = linear(dim, r, sigma_reparam=reparam) if r else None
        self.dispatch_up = linear(r, dim, sigma_reparam=reparam) if r else None
        self.experts = GroupedExperts(
            self.num_experts, moe_cfg.expert_dim(model_cfg), hidden, moe_cfg.expert_backend, sigma_reparam=reparam
        )
        shared_hidden = moe_cfg.shared_hidden_size(model_cfg)
        self.shared_experts = FeedForward(dim, shared_hidden, reparam) if shared_hidden > 0 else None
        gated = shared_hidden > 0 and moe_cfg.shared_expert_gate
        self.shared_gate = linear(dim, 1, sigma_reparam=reparam) if gated else None
        # The plain model can only move tokens on its own device; a dispatcher that exchanges
        # them between ranks needs a process group, and `parallel.apply_ep` installs it.
        self.dispatcher: Dispatcher | None = (
            None
            if moe_cfg.dispatcher in ("all_to_all", "overlapped")
            else LocalDispatcher(self.num_experts, moe_cfg.capacity_factor, moe_cfg.drop_policy)
        )
        # Non-persistent: a step's counts never outlive the step, so they have no place in a checkpoint.
        # A buffer (not a plain attribute) so that it follows the layer to its device.
        self.register_buffer(
            "tokens_per_expert_acc", torch.zeros(self.num_experts, dtype=torch.int64), persistent=False
        )
        self.aux_loss_scale = 1.0
        self.count_reducer: Reducer | None = None
        self.token_split: TokenSplit | None = None
        self.last_stats: MoEStats | None = None
        self.step_stats: MoEStats | None = None
        self._reset_step_sums()

    def forward(self, x_BSD: torch.Tensor, route_BSD: torch.Tensor | None = None) -> torch.Tensor:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        if route_BSD is not None and route_BSD.shape != x_BSD.shape:
            raise ValueError(f"the router's input has shape {list(route_BSD.shape)}, the layer's {list(x_BSD.shape)}")
        if self.dispatcher is None:
            raise ConfigError(
                f"moe.dispatcher={self.moe_cfg.dispatcher}: this layer's experts were not split over expert ranks "
                "(parallel.apply_ep installs that dispatcher at parallel.expert > 1)"
            )
        route = self.router(x_TD if route_BSD is None else route_BSD.reshape(x_TD.shape))
        # The router and the shared experts read the whole D-dim token; only the routed rows descend.
        x_TR = self.dispatch_down(x_TD) if self.dispatch_down is not None else x_TD
        y_TR, shared_TD, dropped = self.dispatcher.run(x_TR, route, self.experts, lambda: self._shared(x_TD))
        y_TD = self.dispatch_up(y_TR) if self.dispatch_up is not None else y_TR
        # Always in this order, so every dispatcher rounds alike.
        if shared_TD is not None:
            y_TD = y_TD + shared_TD

        cfg = self.moe_cfg
        aux_loss = z_loss = None
        if cfg.aux_loss_coeff > 0:
            aux_loss = load_balancing_loss(
                route.scores_TE,
                route.indices_Tk,
                cfg.aux_loss_coeff,
                score_func=cfg.score_func,
                level=cfg.aux_loss_level,
                seq_len=x_BSD.shape[-2] if x_BSD.dim() >= 3 else None,
                count_reducer=self.count_reducer,
                token_split=self.token_split,
            )
        if cfg.z_loss_coeff > 0:
            z_loss = router_z_loss(route.logits_TE, cfg.z_loss_coeff, self.token_split)
        losses = [loss for loss in (aux_loss, z_loss) if loss is not None]
        if losses and torch.is_grad_enabled():
            averaged = self.token_split.averaged if self.token_split is not None else 1
            y_TD = AttachLoss.apply(y_TD, sum(losses), self.aux_loss_scale * averaged)

        training = self.training and torch.is_grad_enabled()
        with torch.no_grad():
            routed_E = expert_counts(route.indices_Tk.reshape(1, -1), self.num_experts)[0]
            stats = MoEStats(
                tokens_per_expert=routed_E,
                aux_loss=aux_loss.detach() if aux_loss is not None else 0.0,
                z_loss=z_loss.detach() if z_loss is not None else 0.0,
                dropped_tokens=dropped,
            )
            self._record(stats, training)
        return y_TD.view(x_BSD.shape)

    def _shared(self, x_TD: torch.Tensor) -> torch.Tensor | None:
        """The shared experts' output, gated when configured; None without shared experts."""
        if self.shared_experts is None:
            return None
        shared_TD = self.shared_experts(x_TD)
        if self.shared_gate is not None:
            shared_TD = shared_TD * torch.sigmoid(self.shared_gate(x_TD))
        return shared_TD

    @torch.compiler.disable
    def _record(self, stats: MoEStats, training: bool) -> None:
        """Keep `stats` as the last forward's; add them to the step's sums if this is a training forward."""
        self.last_stats = stats
        # A forward that runs inside an autograd graph task is activation checkpointing's
        # recompute during the backward: the same numbers were counted by the original forward.
        recompute = torch._C._current_graph_task_id() != -1
        if training and not recompute:
            self.accumulate_stats()

    # Step accounting (driven by training forwards and balancing.update_expert_bias). The sums of
    # aux loss, z loss and dropped tokens are plain attributes, not buffers: they start as 0 and
    # take the device of the stats added to them, a dtype cast of the model (bf16) cannot round
    # them, and like the counts they stay out of the state dict.

    def _reset_step_sums(self) -> None:
        self.tokens_per_expert_acc.zero_()
        self.aux_loss_acc: torch.Tensor | float = 0.0
        self.z_loss_acc: torch.Tensor | float = 0.0
        self.dropped_tokens_acc: torch.Tensor | int = 0
        self.micro_batches_acc = 0

    @torch.no_grad()
    def accumulate_stats(self) -> None:
        """Add the last forward's stats to the step's sums, once: a second call without a new
        forward adds nothing."""
        stats = self.last_stats
        if stats is None or stats.accumulated:
            return
        self.tokens_per_expert_acc += stats.tokens_per_expert
        self.aux_loss_acc = self.aux_loss_acc + stats.aux_loss
        self.z_loss_acc = self.z_loss_acc + stats.z_loss
        self.dropped_tokens_acc = self.dropped_tokens_acc + stats.dropped_tokens
        self.micro_batches_acc += 1
        stats.accumulated = True

    def step_counts(self) -> torch.Tensor:
        """[E + 1] int64: this step's tokens per expert, then its dropped assignments (what
        `update_expert_bias` sums over ranks)."""
        acc = self.tokens_per_expert_acc
        dropped = torch.as_tensor(self.dropped_tokens_acc, dtype=torch.int64, device=acc.device).reshape(1)
        return torch.cat([acc, dropped])

    def step_losses(self) -> torch.Tensor:
        """[2] fp32: this step's aux and z losses, each the mean over its micro-batches (0 when
        none was accumulated); what `update_expert_bias` sums over a token split."""
        n = max(self.micro_batches_acc, 1)
        device = self.tokens_per_expert_acc.device
        return torch.stack(
            [
                torch.as_tensor(acc, dtype=torch.float32, device=device) / n
                for acc in (self.aux_loss_acc, self.z_loss_acc)
            ]
        )

    @torch.no_grad()
    def close_step(self, counts: torch.Tensor, losses: torch.Tensor) -> None:
        """Record the step's stats into `step_stats` and reset the sums. `counts` is
        `step_counts()` and `losses` `step_losses()`, each possibly summed over ranks."""
        self.step_stats = MoEStats(
            tokens_per_expert=counts[:-1].clone(),
            aux_loss=losses[0].clone(),
            z_loss=losses[1].clone(),
            dropped_tokens=counts[-1].clone(),
            accumulated=True,
            micro_batches=self.micro_batches_acc,
        )
        self._reset_step_sums()

    def current_stats(self) -> MoEStats | None:
        """The last optimizer step's stats, else the last forward's, else None."""
        return self.step_stats if self.step_stats is not None else self.last_stats

    def current_load(self) -> torch.Tensor | None:
        """Tokens per expert of the last optimizer step, else of the last forward, else None."""
        stats = self.current_stats()
        return stats.tokens_per_expert if stats is not None else None

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        self.router.init_weights(std)
        if self.dispatch_up is None:
            self.experts.init_weights(std, out_std)
        else:
            # The ascending projection, not the experts, now writes into the residual stream: it
            # takes the depth-scaled std, and the experts' w2 the plain one of an inner layer.
            self.experts.init_weights(std, std)
            nn.init.normal_(self.dispatch_down.weight, std=std)
            nn.init.normal_(self.dispatch_up.weight, std=out_std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(std, out_std)
        if self.shared_gate is not None:
            nn.init.normal_(self.shared_gate.weight, std=std)
        self._reset_step_sums()
        self.last_stats = None
        self.step_stats = None

    def extra_repr(self) -> str:
        cfg = self.moe_cfg
        return (
            f"experts={self.num_experts}, top_k={self.top_k}, shared={cfg.n_shared_experts}, "
            f"router_input={cfg.router_input}, "
            f"dispatch_dim={cfg.dispatch_dim or self.dim}, "
            f"capacity_factor={cfg.capacity_factor}, aux={cfg.aux_loss_coeff}@{cfg.aux_loss_level}, "
            f"z={cfg.z_loss_coeff}, bias_rate={cfg.bias_update_rate}"
        )
