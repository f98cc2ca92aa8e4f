"""Expert pruning and merging: a smaller MoE made of the most used routed experts of a trained one.

    sparsetron prune --from runs/tiny --keep 8 --out runs/tiny-e8        # train/prune.py

From Python, with the model materialised:

    with ExpertUsage(model) as usage:
        model(tokens)                                   # calibration data, any number of forwards
    plan = plan_pruning(usage, keep=8, n_groups=1, merge=False)
    pruned = prune_model(model, pruned_moe_config(model.moe_cfg, model.model_cfg, 8, None), plan)

Symbols: E routed experts per MoE layer, E' = `keep` of them kept, k experts per token (k' after
--top-k), T calibration tokens.

Criterion. Each routed expert's usage on calibration data is the summed routing weight of the
assignments it received, sum over tokens t routed to e of w_te (SEER-MoE's "soft counting" of
heavy hitters; the routing-frequency x gate-weight family of criteria of the one-shot expert
pruning studies). The routed-token count (EUF, "hard counting") is recorded too and breaks ties.
The weight is preferred because an expert that is often picked with a small weight contributes
little to the output. The E' most used experts of each layer are kept, in their original order
(so groups stay contiguous and the dispatcher's expert order is unchanged); with group-limited
routing (n_groups > 1) the E'/n_groups most used of every group, so the groups stay equal.

Exactness. Rows of the router's gate and entries of `expert_bias` of the kept experts are kept,
as are their w13 and w2; every other weight is copied unchanged. When the pruned experts receive
no token, the pruned model computes what the original computed whenever the routing weights do
not depend on the pruned experts' scores: topk_then_softmax (softmax over the selected logits),
normalised weights (norm_topk_prob) and sigmoid scores. With softmax_then_topk without
renormalisation the softmax's denominator loses the pruned experts' probability, so the kept
weights grow by 1 / (1 - that mass) per token; a capacity factor's capacity also follows E'.

Fewer active experts (`top_k`): k' < k selects the k' best of the same scores.

Merging (MC-SMoE's recipe without its neuron alignment): each pruned expert p is merged into the
kept expert q most similar to it by router logits, the cosine of their logit columns over the
calibration tokens (MC-SMoE found router-logit similarity the best signal), and each kept expert
becomes the usage-weighted average of itself and the experts merged into it:
W_q <- (u_q W_q + sum_p u_p W_p) / (u_q + sum_p u_p) for w13 and w2, with u the usage above. Its
router row stays its own. Fine-grained experts' hidden units are not aligned before averaging.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from sparsetron.model.config import ConfigError, ModelConfig, MoEConfig
from sparsetron.model.moe.layer import MoE
from sparsetron.model.moe.router import Router, RouterOutput
from sparsetron.model.transformer import Transformer, materialised_transformer

__all__ = [
    "ExpertUsage",
    "LayerUsage",
    "PrunePlan",
    "check_prunable",
    "plan_pruning",
    "prune_model",
    "pruned_moe_config",
]


@dataclass
class LayerUsage:
    """What one MoE layer's router did over the calibration tokens (float64 sums)."""

    tokens_E: torch.Tensor
    """[E] int64: assignments each expert received (before any capacity drop)."""
    weight_E: torch.Tensor
    """[E] float64: the summed routing weight of those assignments (the pruning criterion)."""
    logit_gram_EE: torch.Tensor
    """[E, E] float64: sum over tokens of the outer product of the router logits; its entries
    give the cosine between two experts' logit columns (the merge similarity)."""

    def similarity_EE(self) -> torch.Tensor:
        """Cosine similarity of the experts' router-logit columns over the calibration tokens."""
        norm_E = self.logit_gram_EE.diagonal().clamp_min(torch.finfo(torch.float64).tiny).sqrt()
        return self.logit_gram_EE / (norm_E[:, None] * norm_E[None, :])


class ExpertUsage:
    """Records each MoE layer's routing during the forwards run inside `with ExpertUsage(model)`.

    `layers` maps the block index of every MoE layer to its LayerUsage. A forward hook on each
    router reads what it returned, so the model runs unchanged (eval or training forwards alike).
    """

    def __init__(self, model: Transformer):
        self.routers: dict[int, Router] = {
            int(key): block.feed_forward.router
            for key, block in model.layers.items()
            if block is not None and isinstance(block.feed_forward, MoE)
        }
        self.layers: dict[int, LayerUsage] = {}
        for layer_id, router in self.routers.items():
            E = router.num_experts
            device = router.gate.weight.device
            self.layers[layer_id] = LayerUsage(
                tokens_E=torch.zeros(E, dtype=torch.int64, device=device),
                weight_E=torch.zeros(E, dtype=torch.float64, device=device),
                logit_gram_EE=torch.zeros(E, E, dtype=torch.float64, device=device),
            )
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> ExpertUsage:
        for layer_id, router in self.routers.items():
            self._handles.append(router.register_forward_hook(self._hook(self.layers[layer_id])))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @staticmethod
    def _hook(usage: LayerUsage):
        @torch.no_grad()
        def record(_module: nn.Module, _inputs, out: RouterOutput) -> None:
            indices = out.indices_Tk.reshape(-1)
            usage.tokens_E += torch.bincount(indices, minlength=usage.tokens_E.numel())
            usage.weight_E.index_add_(0, indices, out.weights_Tk.reshape(-1).to(torch.float64))
            logits_TE = out.logits_TE.to(torch.float64)
            usage.logit_gram_EE += logits_TE.T @ logits_TE

        return record


@dataclass
class PrunePlan:
    """Per MoE layer (block index): the kept experts and, when merging, where each pruned one goes."""

    kept: dict[int, list[int]]
    """Original ids of the kept experts, ascending (their order in the pruned layer)."""
    merged_into: dict[int, dict[int, int]] = field(default_factory=dict)
    """Pruned expert id -> the kept expert id it is merged into (empty without merging)."""
    usage: dict[int, LayerUsage] = field(default_factory=dict)


def check_prunable(moe: MoEConfig, model: ModelConfig, keep: int, top_k: int | None) -> None:
    """Refuse, naming the number or key, a pruning that cannot be done consistently (before any weight is read)."""
    if not moe.enabled:
        raise ConfigError(
            "moe.num_experts: the checkpoint is a dense model (num_experts 0); there are no experts to prune"
        )
    if moe.first_k_dense >= model.n_layers:
        raise ConfigError(
            f"moe.first_k_dense: all {model.n_layers} layers are dense (first_k_dense={moe.first_k_dense}); "
            "there are no experts to prune"
        )
    E, k = moe.routed_experts, moe.experts_per_token
    if not 1 <= keep <= E:
        raise ConfigError(
            f"--keep {keep}: must be in [1, {E}] (the routed experts per layer, num_experts x granularity)"
        )
    k_new = k if top_k is None else top_k
    if top_k is not None and top_k < 1:
        raise ConfigError(f"--top-k {top_k}: must be >= 1")
    if k_new > keep:
        which = f"--top-k {top_k}" if top_k is not None else f"moe.top_k: {k} experts per token (top_k x granularity)"
        raise ConfigError(f"{which} exceeds the {keep} experts kept (--keep {keep}); give --top-k <= {keep}")
    if moe.n_groups > 1:
        if keep % moe.n_groups != 0 or keep // moe.n_groups < 2:
            raise ConfigError(
                f"moe.n_groups={moe.n_groups}: --keep {keep} would leave the expert groups uneven or under 2 "
                f"experts each; give a multiple of {moe.n_groups} of at least {2 * moe.n_groups}"
            )
        reachable = moe.topk_groups * (keep // moe.n_groups)
        if k_new > reachable:
            raise ConfigError(
                f"moe.topk_groups={moe.topk_groups}: the best {moe.topk_groups} groups would hold {reachable} experts, "
                f"fewer than the {k_new} per token; keep more experts or give a smaller --top-k"
            )


def pruned_moe_config(moe: MoEConfig, model: ModelConfig, keep: int, top_k: int | None) -> MoEConfig:
    """The MoE section of the pruned model, at granularity 1: E' experts of the same hidden size,
    k' (or k) per token. E' need not be a multiple of the original granularity, so the expert
    width is written out (expert_hidden) instead of implied by ffn_hidden // granularity; the
    shared experts (n_shared x expert_hidden) keep their width."""
    check_prunable(moe, model, keep, top_k)
    return dataclasses.replace(
        moe,
        num_experts=keep,
        top_k=moe.experts_per_token if top_k is None else top_k,
        granularity=1,
        expert_hidden=moe.hidden_size(model),
    )


def plan_pruning(usage: ExpertUsage | dict[int, LayerUsage], keep: int, n_groups: int, merge: bool) -> PrunePlan:
    """Keep the `keep` most used experts of every layer (the E'/n_groups most used of every group);
    with `merge`, send each pruned expert to its most similar kept one."""
    layers = usage.layers if isinstance(usage, ExpertUsage) else usage
    plan = PrunePlan(kept={}, usage=dict(layers))
    for layer_id, layer in sorted(layers.items()):
        E = layer.tokens_E.numel()
        per_group, size = keep // n_groups, E // n_groups
        kept = []
        for g in range(n_groups):
            ids = range(g * size, (g + 1) * size)
            # Most used first: summed weight, then routed tokens, then the lower id.
            ranked = sorted(ids, key=lambda e: (-float(layer.weight_E[e]), -int(layer.tokens_E[e]), e))
            kept += ranked[:per_group]
        plan.kept[layer_id] = sorted(kept)
        if merge:
            similarity_EE = layer.similarity_EE()
            kept_ids = torch.tensor(plan.kept[layer_id])
            plan.merged_into[layer_id] = {
                p: plan.kept[layer_id][int(similarity_EE[p, kept_ids].argmax())]
                for p in range(E)
                if p not in plan.kept[layer_id]
            }
    return plan


@torch.no_grad()
def prune_model(model: Transformer, moe: MoEConfig, plan: PrunePlan) -> Transformer:
    """A new Transformer with MoE section `moe` (see `pruned_moe_config`) holding `model`'s weights
    with only the kept experts of every MoE layer (merged per the plan); `model` is left unchanged.
    MoBA layers start attending with MoBA (set_full_attention switches them, as for any fresh model)."""
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    for layer_id, kept in plan.kept.items():
        prefix = f"layers.{layer_id}.feed_forward."
        ids = torch.tensor(kept, device=state[prefix + "router.gate.weight"].device)
        for name in ("experts.w13", "experts.w2"):
            state[prefix + name] = _merged(state[prefix + name], kept, plan, layer_id)[ids]
        for name in ("router.gate.weight", "router.expert_bias"):
            state[prefix + name] = state[prefix + name][ids]
    device = next(model.parameters()).device
    pruned = materialised_transformer(model.model_cfg, model.attn_cfg, moe, device)
    pruned.load_state_dict(state, strict=True)
    return pruned


def _merged(w_E: torch.Tensor, kept: list[int], plan: PrunePlan, layer_id: int) -> torch.Tensor:
    """The stacked expert weights [E, ...] with each kept expert replaced by the usage-weighted
    average of itself and the experts merged into it (unchanged without merging)."""
    merged_into = plan.merged_into.get(layer_id)
    if not merged_into:
        return w_E
    u_E = plan.usage[layer_id].weight_E.to(w_E.device)
    out_E = w_E.clone()
    for q in kept:
        members = [q, *sorted(p for p, target in merged_into.items() if target == q)]
        total = u_E[members].sum()
        if len(members) == 1 or total <= 0:
            continue  # nothing merged in, or no usage to weight by: the kept expert as it was
        weights = (u_E[members] / total).view(-1, *([1] * (w_E.dim() - 1)))
        out_E[q] = (weights * w_E[members].to(torch.float64)).sum(dim=0).to(w_E.dtype)
    return out_E
