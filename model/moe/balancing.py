"""Load balancing: auxiliary loss, router z-loss, and the auxiliary-loss-free expert bias.

Shape legend: T tokens, B sequences, S tokens per sequence, E routed experts, k experts per
token, L MoE layers.

Losses here are functions of the router's output; the MoE layer attaches them to the graph.
The model-level helpers at the bottom are what the trainer calls, in this order:

    set_aux_loss_scale(model, 1 / grad_accum_steps)    # once, or whenever it changes
    for each micro-batch:
        loss.backward()          # each training forward adds its stats to the step's sums
    optimizer.step(); update_expert_bias(model, all_reduce=sum_over_dp)   # every step
    metrics = moe_metrics(model); histograms = moe_load_histograms(model)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from sparsetron.model.moe.layer import MoE

Reducer = Callable[[torch.Tensor], torch.Tensor]
"""Returns its argument summed over a process group (an all-reduce SUM; may work in place)."""


@dataclass(frozen=True)
class TokenSplit:
    """The tokens of every sequence are split over `ranks` ranks (sequence and context
    parallelism). The gradients of the MoE layer's parameters are summed over the tensor ranks
    and averaged (by data parallelism) over the `averaged` context ranks among them.

    Each rank then routes only its own tokens. A balancing loss over whole sequences (or
    micro-batches) is rebuilt from the parts: expert counts are summed over the split with
    `reduce`, and the differentiable means over tokens (router probabilities, z-loss) are taken
    locally and divided by `ranks`, since the mean over all tokens is the mean of the equal-sized
    parts' means. Each rank's loss is then its share, the shares sum to one process's loss, and
    so do their gradients; the MoE layer weighs each share's gradient by `averaged`, which the
    average over the context ranks divides out again.
    """

    reduce: Reducer
    ranks: int
    averaged: int = 1


def expert_counts(indices_BN: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many of each row's entries name each expert: [B, N] indices -> [B, E] int64.

    Integer scatter-add is exact, so its result does not depend on the order atomics land in;
    unlike bincount it needs no device-to-host sync to size the output.
    """
    counts_BE = torch.zeros(indices_BN.shape[0], num_experts, dtype=torch.int64, device=indices_BN.device)
    return counts_BE.scatter_add_(1, indices_BN, torch.ones_like(indices_BN, dtype=torch.int64))


def load_balancing_loss(
    scores_TE: torch.Tensor,
    indices_Tk: torch.Tensor,
    coeff: float,
    *,
    score_func: str = "softmax",
    level: str = "micro_batch",
    seq_len: int | None = None,
    count_reducer: Reducer | None = None,
    token_split: TokenSplit | None = None,
) -> torch.Tensor:
    """coeff * E * sum_i f_i * P_i (Switch Transformer, generalised to top-k).

    f_i = (assignments to expert i) / (T * k): the share of all (token, slot) pairs, so the
        f_i sum to 1. Counted, hence not differentiable.
    P_i = mean over tokens of the probability of expert i: the softmax scores, or for sigmoid
        scores each token's scores divided by their sum (DeepSeek-V3).
    Perfectly uniform routing gives f_i = P_i = 1/E and a loss of exactly `coeff`.

    level:
      micro_batch: f and P over all T tokens given.
      sequence: f and P per sequence of `seq_len` tokens, the loss averaged over sequences.
      global: f over every rank of the data-parallel group: `count_reducer` receives the local
        [E + 1] vector (counts, then T * k) and returns it summed over the group; P stays
        local, so that the sum of every rank's gradient is the gradient of the global loss.
        Without a reducer it equals micro_batch.
    token_split: this rank holds one of `token_split.ranks` equal parts of every sequence
      (`seq_len` is the part's length); the result is this rank's share (see TokenSplit).
      With level "global" the `count_reducer` must already sum over the split's ranks too.
    """
    T, E = scores_TE.shape
    k = indices_Tk.shape[1]
    parts = token_split.ranks if token_split is not None else 1
    if score_func == "softmax":
        probs_TE = scores_TE
    else:
        probs_TE = scores_TE / (scores_TE.sum(dim=-1, keepdim=True) + 1e-20)

    if level == "sequence":
        if seq_len is None or seq_len <= 0 or T % seq_len:
            raise ValueError(f"sequence-level aux loss needs a seq_len dividing the {T} tokens, got {seq_len}")
        B = T // seq_len
        counts_BE = expert_counts(indices_Tk.reshape(B, seq_len * k), E)
        if token_split is not None:
            counts_BE = token_split.reduce(counts_BE)
        f_BE = counts_BE.to(probs_TE.dtype) / (seq_len * k * parts)
        P_BE = probs_TE.view(B, seq_len, E).mean(dim=1) / parts
        return coeff * E * (f_BE * P_BE).sum(dim=-1).mean()
    if level not in ("micro_batch", "global"):
        raise ValueError(f"moe.aux_loss_level must be micro_batch, sequence or global, got {level!r}")

    counts_E = expert_counts(indices_Tk.reshape(1, -1), E)[0]
    local = torch.cat([counts_E, counts_E.new_tensor([T * k])])
    if level == "global" and count_reducer is not None:
        local = count_reducer(local)
    elif token_split is not None:
        local = token_split.reduce(local)
    f_E = local[:E].to(probs_TE.dtype) / local[E].to(probs_TE.dtype)
    P_E = probs_TE.mean(dim=0) / parts
    return coeff * E * (f_E * P_E).sum()


def router_z_loss(logits_TE: torch.Tensor, coeff: float, token_split: TokenSplit | None = None) -> torch.Tensor:
    """coeff * mean over tokens of logsumexp(logits)^2 (ST-MoE): keeps logits from growing.

    With `token_split`, this rank's share: its local mean divided by the number of parts.
    """
    parts = token_split.ranks if token_split is not None else 1
    return coeff * torch.logsumexp(logits_TE, dim=-1).square().mean() / parts


# ---------------------------------------------------------------------------------------------
# Model-level helpers for the trainer.


def _moe_class():
    # Imported late: the MoE layer imports this module for its losses.
    from sparsetron.model.moe.layer import MoE

    return MoE


def moe_layers(model: nn.Module) -> list[MoE]:
    """Every MoE layer of `model`, in module order."""
    moe = _moe_class()
    return [m for m in model.modules() if isinstance(m, moe)]


def _numbered_moe_layers(model: nn.Module) -> list[tuple[int, MoE]]:
    """(layer number, layer) pairs: the `layer_id` of the nearest enclosing module that has one
    (a transformer Block), else the MoE layer's position among the model's MoE layers."""
    moe = _moe_class()
    named = dict(model.named_modules())
    out = []
    for name, module in named.items():
        if not isinstance(module, moe):
            continue
        layer_id = len(out)
        parts = name.split(".") if name else []
        for cut in range(len(parts), -1, -1):
            candidate = getattr(named.get(".".join(parts[:cut])), "layer_id", None)
            if isinstance(candidate, int):
                layer_id = candidate
                break
        out.append((layer_id, module))
    return out


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """Gradient the attached aux and z losses receive (1 / grad_accum_steps, so that they are
    averaged over micro-batches the way the language-model loss is)."""
    for layer in moe_layers(model):
        layer.aux_loss_scale = float(scale)


@torch.no_grad()
def update_expert_bias(model: nn.Module, all_reduce: Reducer | None = None, apply: bool = True) -> None:
    """Close the optimizer step: bias_i += rate * sign(mean load - load_i), then reset the sums.

    Call after every optimizer step, also when no layer uses the bias: it records the step's
    stats in each layer's `step_stats` for `moe_metrics` (tokens per expert and dropped tokens
    summed over micro-batches, aux and z losses averaged over them) and resets the accumulators.
    `all_reduce` sums the counts (tokens per expert and dropped tokens) over every rank that saw
    different tokens (data-, context- and sequence-parallel); all layers' counts travel in one
    call. The aux and z losses stay this rank's, except that shares of one sequence (a layer's
    `token_split`) are summed into the whole. apply=False (a skipped step) records and resets
    without moving the bias.
    """
    layers = moe_layers(model)
    if not layers:
        return
    counts = torch.cat([layer.step_counts() for layer in layers])
    if all_reduce is not None:
        counts = all_reduce(counts)
    losses = torch.stack([layer.step_losses() for layer in layers])
    split = layers[0].token_split
    if split is not None:
        losses = split.reduce(losses)
    splits = counts.split([lay.num_experts + 1 for lay in layers])
    for layer, counts_E1, losses_2 in zip(layers, splits, losses, strict=True):
        layer.close_step(counts_E1, losses_2)
        rate = layer.moe_cfg.bias_update_rate
        if apply and rate > 0:
            load_f = counts_E1[:-1].to(torch.float32)
            # sign() makes the step size independent of the batch size and of how skewed the load is.
            layer.router.expert_bias += rate * torch.sign(load_f.mean() - load_f)


def moe_load_histograms(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per MoE layer, f"moe/layer{i}/tokens_per_expert": the [E] int64 tokens per expert of the
    last step (as `moe_metrics` reports them; before the first step, the last forward's), on the CPU."""
    out = {}
    for layer_id, layer in _numbered_moe_layers(model):
        load = layer.current_load()
        if load is not None:
            out[f"moe/layer{layer_id}/tokens_per_expert"] = load.detach().to("cpu", copy=True)
    return out


def moe_metrics(model: nn.Module) -> dict[str, float]:
    """Per MoE layer: max, mean and min tokens per expert, load_imbalance (max / mean), aux_loss,
    z_loss (0 when off), dropped_tokens and bias_norm.

    All but bias_norm describe the last step as recorded by `update_expert_bias`: loads and
    dropped tokens summed over its micro-batches (and, with all_reduce, ranks), aux and z losses
    their mean over its micro-batches; a forward after the step (evaluation) changes none of
    them. Before the first step, the last forward's.
    """
    items: list[tuple[str, torch.Tensor | float]] = []
    for layer_id, layer in _numbered_moe_layers(model):
        prefix = f"moe/layer{layer_id}/"
        stats = layer.current_stats()
        if stats is not None:
            load = stats.tokens_per_expert.detach().to(torch.float32)
            mean = load.mean()
            items += [
                (prefix + "max_load", load.max()),
                (prefix + "mean_load", mean),
                (prefix + "min_load", load.min()),
                (prefix + "load_imbalance", load.max() / mean.clamp_min(1e-12)),
                (prefix + "aux_loss", stats.aux_loss),
                (prefix + "z_loss", stats.z_loss),
                (prefix + "dropped_tokens", stats.dropped_tokens),
            ]
        items.append((prefix + "bias_norm", layer.router.expert_bias.detach().norm()))
    # One device-to-host transfer for all numbers, rather than a sync per number.
    tensors = [v for _, v in items if isinstance(v, torch.Tensor)]
    host = iter(torch.stack([t.to(torch.float64) for t in tensors]).tolist() if tensors else [])
    return {key: next(host) if isinstance(v, torch.Tensor) else float(v) for key, v in items}
