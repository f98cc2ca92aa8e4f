"""Token-choice router: a linear score per expert, top-k selection, routing weights.

Shape legend: T tokens, D model dim, E routed experts, k experts per token, G expert groups.

Math runs in fp32 (fp64 when the input is fp64, which only tests use) whatever the model's
dtype and autocast say: softmax over many experts and small weight differences decide which
expert a token reaches, and bf16 would flip those choices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparsetron.model.config import MoEConfig
from sparsetron.model.sigma_reparam import linear, linear_weight


@dataclass
class RouterOutput:
    indices_Tk: torch.Tensor
    """Chosen experts per token, int64, in order of decreasing selection score."""
    weights_Tk: torch.Tensor
    """Routing weight of each chosen expert (fp32), after normalisation and route_scale."""
    scores_TE: torch.Tensor
    """score_func over all experts (softmax probabilities or sigmoid scores), without the bias."""
    logits_TE: torch.Tensor
    """Raw router logits (fp32), for the z-loss."""


class Router(nn.Module):
    """Scores every expert for every token and picks `experts_per_token` of them.

    Orders (see MoEConfig.route_order):
      softmax_then_topk: scores = score_func(logits) over all E; select the top k of
        scores + bias; weights = the selected scores.
      topk_then_softmax: select the top k of logits + bias; weights = softmax over the k
        selected logits (or sigmoid of each, for sigmoid scores).
    Then optional renormalisation to sum 1 (norm_topk_prob), then times route_scale.

    Group-limited routing (n_groups > 1): each group is scored by the sum of its two best
    selection scores, and a token may only pick experts from its best `topk_groups` groups.

    `expert_bias` (auxiliary-loss-free balancing) shifts the selection scores only; the
    weights are always the unbiased scores of the chosen experts, so the bias steers load
    without distorting what the experts' outputs are mixed with.

    `moe_cfg` is taken as validated (MoEConfig.validate checks n_groups, topk_groups, top_k).
    """

    def __init__(self, dim: int, moe_cfg: MoEConfig, sigma_reparam: bool = False):
        super().__init__()
        self.num_experts = moe_cfg.routed_experts
        self.top_k = moe_cfg.experts_per_token
        self.score_func = moe_cfg.score_func
        self.route_order = moe_cfg.route_order
        self.norm_topk_prob = moe_cfg.norm_topk_prob
        self.route_scale = moe_cfg.route_scale
        self.n_groups = moe_cfg.n_groups
        self.topk_groups = moe_cfg.topk_groups
        if self.score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"moe.score_func must be 'softmax' or 'sigmoid', got {self.score_func!r}")
        if self.route_order not in ("softmax_then_topk", "topk_then_softmax"):
            raise ValueError(f"moe.route_order: unknown order {self.route_order!r}")
        self.gate = linear(dim, self.num_experts, sigma_reparam=sigma_reparam)
        # Persistent: a resumed run must keep steering load the way it was. Kept fp32 because
        # updates of size bias_update_rate would vanish in bf16.
        self.register_buffer("expert_bias", torch.zeros(self.num_experts, dtype=torch.float32), persistent=True)

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        if x_TD.dim() != 2:
            raise ValueError(f"router expects tokens flattened to [T, D], got shape {tuple(x_TD.shape)}")
        dtype = torch.promote_types(x_TD.dtype, torch.float32)
        weight_ED = linear_weight(self.gate)  # what FSDP's mixed precision would gather
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.to(dtype), weight_ED.to(dtype))
            if self.score_func == "softmax":
                scores_TE = torch.softmax(logits_TE, dim=-1)
            else:
                scores_TE = torch.sigmoid(logits_TE)

            with torch.no_grad():
                choice_TE = scores_TE if self.route_order == "softmax_then_topk" else logits_TE
                choice_TE = choice_TE + self.expert_bias.to(dtype)
                if self.n_groups > 1:
                    choice_TE = self._limit_to_best_groups(choice_TE)
                indices_Tk = torch.topk(choice_TE, self.top_k, dim=-1, sorted=True).indices

            if self.route_order == "softmax_then_topk":
                weights_Tk = scores_TE.gather(-1, indices_Tk)
            else:
                chosen_Tk = logits_TE.gather(-1, indices_Tk)
                weights_Tk = torch.softmax(chosen_Tk, dim=-1) if self.score_func == "softmax" else chosen_Tk.sigmoid()
            if self.norm_topk_prob:
                # The epsilon only guards an all-zero row (sigmoid underflow); it is far below fp32's resolution of 1.
                weights_Tk = weights_Tk / (weights_Tk.sum(dim=-1, keepdim=True) + 1e-20)
            if self.route_scale != 1.0:
                weights_Tk = weights_Tk * self.route_scale
        return RouterOutput(indices_Tk=indices_Tk, weights_Tk=weights_Tk, scores_TE=scores_TE, logits_TE=logits_TE)

    def _limit_to_best_groups(self, choice_TE: torch.Tensor) -> torch.Tensor:
        """Set the selection score of every expert outside a token's best groups to -inf."""
        T, E = choice_TE.shape
        G = self.n_groups
        choice_TGe = choice_TE.view(T, G, E // G)
        # Top-2 sum (DeepSeek-V3) rather than the max: a group is good when it has more than one good expert.
        group_score_TG = choice_TGe.topk(2, dim=-1).values.sum(dim=-1)
        best_Tm = group_score_TG.topk(self.topk_groups, dim=-1).indices
        allowed_TG = torch.zeros(T, G, dtype=torch.bool, device=choice_TE.device).scatter_(1, best_Tm, True)
        return choice_TGe.masked_fill(~allowed_TG.unsqueeze(-1), float("-inf")).view(T, E)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) (or .half()) would round the bias and swallow every later update
        # of size bias_update_rate; moving devices (to_empty included) is all the bias may undergo.
        # Casting back after the fact is not enough (the value is already rounded), so the exact
        # fp32 tensor is kept and put back on whatever device fn sent the buffer to.
        bias = self.expert_bias
        super()._apply(fn, recurse)
        moved = self.expert_bias
        if moved.dtype != torch.float32:
            self.expert_bias = bias.to(device=moved.device, dtype=torch.float32)
        return self

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.gate.weight, std=std)
        self.expert_bias.zero_()

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, top_k={self.top_k}, score_func={self.score_func}, order={self.route_order}, "
            f"norm_topk_prob={self.norm_topk_prob}, route_scale={self.route_scale}, "
            f"groups={self.topk_groups}/{self.n_groups}"
        )
