"""Dense-to-MoE upcycling that preserves the dense model's function (../shared/specs/upcycling.md).

    sparsetron upcycle --from runs/dense/checkpoints --recipe tiny --out runs/tiny-up/init

From Python, with both models built and materialised (the MoE one's own init supplies the
random router rows):

    plan = upcycle(dense_model, moe_model)      # fills moe_model in place; returns what it did

Symbols (the spec's): F dense FFN hidden size, f = moe.hidden_size (expert hidden size),
G = F / f shards per copy of the dense FFN (sparsetron's `granularity` when expert_hidden is
left at 0), E = num_experts x granularity routed experts, k = top_k x granularity experts per
token, R = E / G copies, m = k / G whole copies per token.

The transform:
  * Routed expert e = c*G + j holds shard j of copy c: hidden units [j*f, (j+1)*f) of the dense
    FFN, gate (w1) and up (w3) sliced separately and kept paired in w13 = [w1 | w3].
  * Every other weight (embeddings, attention, norms, head, the FFNs of layers that stay dense)
    is copied unchanged.
  * Router, "virtual groups": the G experts of one copy get identical rows (the row the MoE
    model's own init gave the copy's first expert), so they are selected together and each
    gets weight route_scale * q_c / G with q normalised over the m selected copies. Used when
    the routing weights are normalised over the selected experts (topk_then_softmax with
    softmax scores, or norm_topk_prob). Otherwise (softmax_then_topk without renormalisation)
    the router is zero: every weight is route_scale / E. A zero router ties all experts, so
    `expert_bias` (which moves selection only, never the weights) gets -c * TIE_BREAK for
    copy c: whole copies are selected, lowest first, on any backend. Sigmoid scores (which need
    norm_topk_prob) and group-limited routing whose groups nest with the copies stay exact; the
    balancing losses and the expert bias's updates act only from the first optimizer step on.
  * Scale s on the down projection (w2) only, so the result is exact for SwiGLU:
    normalised weights: s = G / route_scale; zero router, unnormalised: s = E*G / (k*route_scale).
  * Shared experts (one SwiGLU of S = moe.shared_hidden_size units: n_s*f, or any
    moe.shared_expert_hidden <= F) hold the dense FFN's first S hidden units, with their down
    projection times `shared_fraction` (b). The routed copies' units 0..S-1 take the rest: those
    columns of their down projection are times s*(1-b) instead of s (a SwiGLU's hidden units are
    independent, so the split may cut a shard). Shared + routed = b*P + (1-b)*P + (the other
    units) = dense, exactly. The default b = 1/2 keeps every routed unit non-zero (b = 1 would
    zero units 0..S-1 of the routed copies). With shared_expert_gate the gate starts at zero
    (sigmoid = 1/2) and the shared w2 is doubled to compensate.
  * moe.router_input=pre_attention changes only what the router reads: every copy still sums
    to the dense FFN whichever copies a token selects, so the result stays exact.

Settings that cannot preserve the function are refused with UpcycleError naming the key, or,
with allow_inexact=True, accepted with an UpcycleWarning saying why (see `plan_upcycle`).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from sparsetron.model.block import uses_moe
from sparsetron.model.config import AttentionConfig, ModelConfig, MoEConfig

__all__ = ["TIE_BREAK", "UpcycleError", "UpcyclePlan", "UpcycleWarning", "plan_upcycle", "upcycle"]

TIE_BREAK = 1e-6
"""Selection-bias step between consecutive copies under a zero router: far above fp32's resolution
of a score (1/E or 1/2), far below the score differences training produces."""

# Fields that change the function but not a tensor's shape: a difference is inexact, not impossible.
_IGNORED_MODEL_FIELDS = ("init_std", "max_seq_len")


class UpcycleError(ValueError):
    """The dense model cannot be upcycled into this MoE (or not exactly, without allow_inexact)."""


class UpcycleWarning(UserWarning):
    """An inexact upcycling setting was accepted because allow_inexact was given."""


@dataclass
class UpcyclePlan:
    """What `upcycle` does: the spec's symbols, the router and scale it uses, and why it is inexact."""

    shards: int
    """G = F / f: shards of the dense FFN per copy."""
    experts: int
    """E: routed experts."""
    experts_per_token: int
    """k: routed experts per token."""
    router: str
    """virtual_groups (identical rows per copy, random across copies) or zero (plus the tie-break bias)."""
    scale: float
    """s: factor on the routed experts' down projection (hidden units the shared experts do not hold)."""
    shared_fraction: float
    """b: the shared experts' share of the dense hidden units 0..S-1 they hold (0 when there are none)."""
    shared_units: int = 0
    """S: the dense FFN's first S hidden units, which the shared experts start from (0 when there are none)."""
    moe_layers: list[int] = field(default_factory=list)
    dense_layers: list[int] = field(default_factory=list)
    inexact: list[str] = field(default_factory=list)
    """Reasons the result will not equal the dense model (empty = exact)."""

    @property
    def copies(self) -> int:
        return self.experts // self.shards

    def describe(self) -> str:
        lines = [
            f"G={self.shards} shards per copy, E={self.experts} experts = {self.copies} copies, "
            f"k={self.experts_per_token} per token; router {self.router}, down-projection scale {self.scale:g}",
            f"MoE layers {self.moe_layers}, dense layers {self.dense_layers}",
        ]
        if self.shared_fraction:
            lines.append(
                f"shared experts carry {self.shared_fraction:g} of dense hidden units 0..{self.shared_units - 1}"
            )
        lines += [f"INEXACT: {reason}" for reason in self.inexact]
        return "\n".join(lines)


def _normalised(moe: MoEConfig) -> bool:
    """Whether the selected experts' weights sum to route_scale whatever the router rows are."""
    return moe.norm_topk_prob or (moe.route_order == "topk_then_softmax" and moe.score_func == "softmax")


def plan_upcycle(
    dense_model: ModelConfig,
    dense_attention: AttentionConfig,
    model: ModelConfig,
    attention: AttentionConfig,
    moe: MoEConfig,
    *,
    router: str = "auto",
    shared_fraction: float = 0.5,
    allow_inexact: bool = False,
) -> UpcyclePlan:
    """Check that the dense model (dense_*) can become the MoE (model, attention, moe); return the plan.

    router: auto (virtual_groups where that is exact, else zero), virtual_groups, or zero.
    Raises UpcycleError for what cannot be built (shapes), and for what would not preserve the
    function unless allow_inexact, in which case the reasons are in `plan.inexact`.
    """
    if not moe.enabled:
        raise UpcycleError("moe.num_experts: the target recipe is dense (num_experts 0); nothing to upcycle into")
    if moe.dispatch_dim:
        raise UpcycleError(
            f"moe.dispatch_dim={moe.dispatch_dim}: a dense FFN has no low-dimension dispatch projections to "
            "start them from, so no upcycled model would compute what the dense one does; set 0"
        )
    if model.mtp_depth or dense_model.mtp_depth:
        raise UpcycleError(
            f"model.mtp_depth: the dense model has {dense_model.mtp_depth} multi-token prediction depths and the "
            f"MoE recipe {model.mtp_depth}; upcycling covers the main blocks only, so set 0 in both (add MTP "
            "depths by training from scratch)"
        )
    if dense_model.sigma_reparam or model.sigma_reparam:
        raise UpcycleError(
            "model.sigma_reparam: upcycling copies plain dense weights into experts; a reparametrized "
            "model's weights are not what it computes with (W * gamma / sigma(W)), so set it false on both"
        )
    if router not in ("auto", "virtual_groups", "zero"):
        raise UpcycleError(f"router must be auto, virtual_groups or zero, got {router!r}")
    shape_problems, inexact = [], []
    for section, old, new in (("model", dense_model, model), ("attention", dense_attention, attention)):
        shape_fields = type(old).SHAPE_FIELDS
        for key in (fld.name for fld in dataclasses.fields(old)):
            before, after = getattr(old, key), getattr(new, key)
            if before == after or (section == "model" and key in _IGNORED_MODEL_FIELDS):
                continue
            line = f"{section}.{key}: dense model {before!r}, MoE recipe {after!r}"
            if key in shape_fields:
                shape_problems.append(line)
            else:
                inexact.append(f"{line} (changes the function)")
    if shape_problems:
        raise UpcycleError("the MoE recipe's shapes do not match the dense model's:\n  " + "\n  ".join(shape_problems))

    F, f = model.ffn_hidden, moe.hidden_size(model)
    E, k = moe.routed_experts, moe.experts_per_token
    if F % f:
        raise UpcycleError(
            f"moe.expert_hidden: the dense FFN hidden size {F} is not a multiple of the expert hidden size {f}; "
            "experts must be whole slices of it (G = F / f an integer)"
        )
    G = F // f
    if E % G:
        raise UpcycleError(
            f"moe.num_experts: {E} routed experts (num_experts x granularity) are not a multiple of "
            f"G = ffn_hidden / expert_hidden = {G}: experts must form whole copies of the dense FFN"
        )
    n_shared, shared_hidden = moe.n_shared_experts, moe.shared_hidden_size(model)
    if shared_hidden > F:
        key = "moe.shared_expert_hidden" if moe.shared_expert_hidden else "moe.n_shared_experts"
        raise UpcycleError(
            f"{key}: the shared experts' {shared_hidden} hidden units are more than the dense FFN's {F}; "
            "they must start from a slice of it"
        )
    if n_shared and not 0 < shared_fraction <= 1:
        raise UpcycleError(f"shared_fraction must be in (0, 1], got {shared_fraction}")

    if k % G:
        inexact.append(
            f"moe.top_k: top_k x granularity = {k} experts per token is not a multiple of G = {G}: tokens get "
            "partial copies of the dense FFN, whose output is then off by tens of percent or more; use a top_k "
            "that makes it a multiple"
        )
    normalised = _normalised(moe)
    if router == "auto":
        router = "virtual_groups" if normalised else "zero"
    if router == "virtual_groups" and not normalised:
        inexact.append(
            "moe.route_order: softmax_then_topk without norm_topk_prob and a random (virtual-group) router: "
            f"the weights of the selected experts do not sum to a constant, so the scale E*G/k = {E * G / k:g} "
            "is only right on average; use router zero, norm_topk_prob, or topk_then_softmax"
        )
    if moe.capacity_factor > 0:
        inexact.append(
            f"moe.capacity_factor: {moe.capacity_factor} limits each expert's tokens, and dropped tokens lose "
            "their FFN output (a virtual-group router sends every token of a copy to the same experts); "
            "set 0 (dropless)"
        )
    group = E // moe.n_groups
    # Exact when each group holds whole copies, or when copies are whole numbers of groups and
    # the best topk_groups groups always hold the m best copies whole.
    nested = group % G == 0 or (G % group == 0 and k // G <= moe.topk_groups // (G // group))
    if moe.n_groups > 1 and not nested:
        inexact.append(
            f"moe.n_groups: groups of {group} experts do not nest with the copies of {G} shards "
            f"(topk_groups {moe.topk_groups}), so group-limited routing can select part of a copy; "
            "use groups of whole copies"
        )
    if inexact and not allow_inexact:
        raise UpcycleError(
            "this upcycling would not preserve the dense model's function (pass allow_inexact / "
            "--allow-inexact to accept it anyway):\n  " + "\n  ".join(inexact)
        )

    route_scale = moe.route_scale
    # Normalised: a token's selected weights sum to route_scale. Otherwise each is route_scale / E
    # (exactly under a zero router, on average under a random one).
    scale = G / route_scale if normalised else E * G / (k * route_scale)
    moe_layers = [i for i in range(model.n_layers) if uses_moe(i, moe)]
    return UpcyclePlan(
        shards=G,
        experts=E,
        experts_per_token=k,
        router=router,
        scale=scale,
        shared_fraction=shared_fraction if n_shared else 0.0,
        shared_units=shared_hidden,
        moe_layers=moe_layers,
        dense_layers=[i for i in range(model.n_layers) if i not in moe_layers],
        inexact=inexact,
    )


def _moe_ffn_state(
    prefix: str, w1_FD: torch.Tensor, w3_FD: torch.Tensor, w2_DF: torch.Tensor, init: dict, plan: UpcyclePlan, moe
) -> dict[str, torch.Tensor]:
    """The MoE layer's tensors (keys under `prefix`) built from one dense SwiGLU's weights."""
    G, E = plan.shards, plan.experts
    F, D = w1_FD.shape
    f = F // G
    shared = slice(0, plan.shared_units)
    b = plan.shared_fraction
    # Per dense hidden unit: the routed copies' share of it (what the shared experts leave).
    # In the precision a product with a Python float would use (fp32 for 16-bit weights).
    opmath = torch.promote_types(w2_DF.dtype, torch.float32)
    unit_scale_F = torch.full((F, 1), plan.scale, dtype=opmath, device=w2_DF.device)
    unit_scale_F[shared] = plan.scale * (1 - b)
    w13, w2 = [], []
    for e in range(E):
        j = e % G
        units = slice(j * f, (j + 1) * f)
        # Input-major [D, f] halves, gate then up: the layout GroupedExperts computes x @ w13 with.
        w13.append(torch.cat([w1_FD[units].t(), w3_FD[units].t()], dim=1))
        w2.append((w2_DF[:, units].t() * unit_scale_F[units]).to(w2_DF.dtype))
    out = {prefix + "experts.w13": torch.stack(w13), prefix + "experts.w2": torch.stack(w2)}

    gate_EDk = init[prefix + "router.gate.weight"]
    bias = init[prefix + "router.expert_bias"]
    copy_of = torch.arange(E, device=gate_EDk.device) // G
    if plan.router == "virtual_groups":
        out[prefix + "router.gate.weight"] = gate_EDk[copy_of * G].clone()
        out[prefix + "router.expert_bias"] = torch.zeros_like(bias)
    else:
        out[prefix + "router.gate.weight"] = torch.zeros_like(gate_EDk)
        out[prefix + "router.expert_bias"] = -TIE_BREAK * copy_of.to(bias.dtype)

    if plan.shared_units:
        # sigmoid(0) = 1/2 exactly, so a zero gate is undone by doubling the down projection.
        gated = 2.0 if moe.shared_expert_gate else 1.0
        out[prefix + "shared_experts.w1.weight"] = w1_FD[shared].clone()
        out[prefix + "shared_experts.w3.weight"] = w3_FD[shared].clone()
        out[prefix + "shared_experts.w2.weight"] = w2_DF[:, shared] * (b * gated)
        if moe.shared_expert_gate:
            out[prefix + "shared_gate.weight"] = torch.zeros_like(init[prefix + "shared_gate.weight"])
    return out


@torch.no_grad()
def upcycle(
    dense: nn.Module,
    moe_model: nn.Module,
    *,
    router: str = "auto",
    shared_fraction: float = 0.5,
    allow_inexact: bool = False,
) -> UpcyclePlan:
    """Fill `moe_model` (a materialised MoE Transformer) from `dense` (a dense Transformer); return the plan.

    The MoE model's own initial router rows are the random rows of the virtual groups (so
    seed its init for a reproducible result). Raises UpcycleError if the dense model is not
    dense, the shapes do not fit, or the result would be inexact and allow_inexact is False;
    an accepted inexact setting raises an UpcycleWarning per reason.
    """
    moe_cfg = moe_model.moe_cfg
    plan = plan_upcycle(
        dense.model_cfg,
        dense.attn_cfg,
        moe_model.model_cfg,
        moe_model.attn_cfg,
        moe_cfg,
        router=router,
        shared_fraction=shared_fraction,
        allow_inexact=allow_inexact,
    )
    for reason in plan.inexact:
        warnings.warn(f"upcycling is not function-preserving: {reason}", UpcycleWarning, stacklevel=2)
    source = dense.state_dict()
    routed = sorted({key.split(".feed_forward.")[0] for key in source if ".feed_forward.router." in key})
    if routed:
        raise UpcycleError(f"the source model is not dense: {', '.join(routed)} already hold MoE layers")
    init = moe_model.state_dict()
    target: dict[str, torch.Tensor] = {}
    for layer_id in plan.moe_layers:
        prefix = f"layers.{layer_id}.feed_forward."
        try:
            w1, w3, w2 = (source[f"{prefix}{name}.weight"] for name in ("w1", "w3", "w2"))
        except KeyError as err:
            raise UpcycleError(f"the dense model has no FFN weight {err.args[0]} for MoE layer {layer_id}") from err
        target.update(_moe_ffn_state(prefix, w1, w3, w2, init, plan, moe_cfg))
    for key, value in init.items():
        if key in target:
            continue
        if key not in source:
            raise UpcycleError(f"the dense model has no tensor {key} for the MoE model")
        if source[key].shape != value.shape:
            raise UpcycleError(f"{key}: dense {list(source[key].shape)} vs MoE {list(value.shape)}")
        target[key] = source[key]
    moe_ffn = {f"layers.{i}.feed_forward.{name}.weight" for i in plan.moe_layers for name in ("w1", "w2", "w3")}
    unused = sorted(key for key in source if key not in target and key not in moe_ffn)
    if unused:
        raise UpcycleError(f"dense tensors with no place in the MoE model: {', '.join(unused[:12])}")
    moe_model.load_state_dict({k: v.to(init[k].dtype) for k, v in target.items()}, strict=True)
    return plan
