"""MoE layer and local dispatcher against a naive per-token fp64 computation.

The naive reference routes each token with Python loops (sorted(), explicit group scores),
applies each chosen expert as its own small SwiGLU, and applies capacity by listing every
expert's assignments; it shares no code with the layer.

Shape legend: B batch, S sequence, T tokens, D model dim, E experts, k experts per token.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_within_dtype_error
from torch.utils.checkpoint import checkpoint

from sparsetron.model.config import ConfigError, ModelConfig, MoEConfig
from sparsetron.model.moe import MoE
from sparsetron.model.moe.balancing import load_balancing_loss, router_z_loss
from sparsetron.model.moe.dispatch import LocalDispatcher

DIM = 12
MODEL = ModelConfig(dim=DIM, ffn_hidden=20)
EPS64 = torch.finfo(torch.float64).eps


def assert_close64(actual, expected, name):
    # fp64 paths differing only in summation order agree to ~1e-15 relative; 1e4 * eps leaves room
    # for the reduction depth while a wrong route or weight (an O(1) error) still fails.
    scale = max(expected.abs().max().item(), 1e-30)
    err = (actual - expected).abs().max().item()
    assert err <= 1e4 * EPS64 * scale, f"{name}: error {err:.3g} vs scale {scale:.3g}"


# ------------------------------------------------------------------------------------------
# Naive reference.


def naive_route(x_D, p, cfg):
    """One token: (experts, weights), by the MoEConfig definitions."""
    E, k = cfg.routed_experts, cfg.experts_per_token
    logits = p["gate"] @ x_D
    scores = torch.softmax(logits, 0) if cfg.score_func == "softmax" else torch.sigmoid(logits)
    base = scores if cfg.route_order == "softmax_then_topk" else logits
    choice = [v + b for v, b in zip(base.tolist(), p["bias"].tolist(), strict=True)]
    allowed = list(range(E))
    if cfg.n_groups > 1:
        size = E // cfg.n_groups
        group_score = [sum(sorted(choice[g * size : (g + 1) * size], reverse=True)[:2]) for g in range(cfg.n_groups)]
        best = sorted(range(cfg.n_groups), key=lambda g: -group_score[g])[: cfg.topk_groups]
        allowed = [e for g in best for e in range(g * size, (g + 1) * size)]
    chosen = sorted(allowed, key=lambda e: -choice[e])[:k]
    if cfg.route_order == "softmax_then_topk":
        w = scores[chosen]
    else:
        w = torch.softmax(logits[chosen], 0) if cfg.score_func == "softmax" else torch.sigmoid(logits[chosen])
    if cfg.norm_topk_prob:
        w = w / w.sum()
    return chosen, w * cfg.route_scale


def naive_keep(routes, cfg):
    """Set of kept (t, j) under the capacity rule, by listing each expert's assignments."""
    T, k, E = len(routes), cfg.experts_per_token, cfg.routed_experts
    if cfg.capacity_factor <= 0:
        return {(t, j) for t in range(T) for j in range(k)}
    capacity = math.ceil(cfg.capacity_factor * T * k / E)
    kept = set()
    for e in range(E):
        mine = [
            (t, j, float(w[j].detach())) for t, (chosen, w) in enumerate(routes) for j in range(k) if chosen[j] == e
        ]
        if cfg.drop_policy == "probability":
            mine.sort(key=lambda a: (-a[2], a[0] * k + a[1]))
        kept |= {(t, j) for t, j, _ in mine[:capacity]}
    return kept


def swiglu(x_D, w1, w3, w2):
    return (F.silu(x_D @ w1) * (x_D @ w3)) @ w2


def naive_moe(x_TD, p, cfg):
    routes = [naive_route(x_TD[t], p, cfg) for t in range(x_TD.shape[0])]
    kept = naive_keep(routes, cfg)
    out = []
    for t, (chosen, w) in enumerate(routes):
        y = torch.zeros_like(x_TD[t])
        for j, e in enumerate(chosen):
            if (t, j) in kept:
                H = p["w2"].shape[1]
                y = y + w[j] * swiglu(x_TD[t], p["w13"][e][:, :H], p["w13"][e][:, H:], p["w2"][e])
        if "s1" in p:
            shared = swiglu(x_TD[t], p["s1"].T, p["s3"].T, p["s2"].T)
            if "sgate" in p:
                shared = shared * torch.sigmoid(p["sgate"] @ x_TD[t])
            y = y + shared
        out.append(y)
    return torch.stack(out), routes, kept


PARAM_NAMES = {
    "router.gate.weight": "gate",
    "experts.w13": "w13",
    "experts.w2": "w2",
    "shared_experts.w1.weight": "s1",
    "shared_experts.w3.weight": "s3",
    "shared_experts.w2.weight": "s2",
    "shared_gate.weight": "sgate",
}


def build(cfg, seed=0, dtype=torch.float64, random_bias=False):
    torch.manual_seed(seed)
    moe = MoE(DIM, MODEL, cfg)
    moe.init_weights(0.3, 0.2)
    if random_bias:
        with torch.no_grad():
            moe.router.expert_bias.copy_(torch.randn(cfg.routed_experts) * 0.05)
    return moe.to(dtype)


def naive_params(moe):
    p = {PARAM_NAMES[n]: t.detach().clone().requires_grad_() for n, t in moe.named_parameters()}
    p["bias"] = moe.router.expert_bias.detach().double()
    return p


CONFIGS = {
    "softmax": MoEConfig(num_experts=8, top_k=2),
    "softmax_norm_scaled": MoEConfig(num_experts=6, top_k=3, norm_topk_prob=True, route_scale=1.7),
    "topk_then_softmax_shared_g2": MoEConfig(
        num_experts=4, top_k=1, granularity=2, route_order="topk_then_softmax", n_shared_experts=1
    ),
    "deepseek": MoEConfig(
        num_experts=8,
        top_k=2,
        score_func="sigmoid",
        norm_topk_prob=True,
        route_scale=2.5,
        n_groups=4,
        topk_groups=2,
        n_shared_experts=2,
        shared_expert_gate=True,
        expert_hidden=7,
    ),
    # Two shared experts of 13 units together: no multiple of the routed experts' 7.
    "shared_any_width": MoEConfig(
        num_experts=4, top_k=2, expert_hidden=7, n_shared_experts=2, shared_expert_hidden=13, shared_expert_gate=True
    ),
    "capacity_probability": MoEConfig(num_experts=8, top_k=2, capacity_factor=0.75, drop_policy="probability"),
    "capacity_position": MoEConfig(num_experts=8, top_k=2, capacity_factor=0.75, drop_policy="position"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_layer_output_and_every_gradient_match_naive_fp64(name):
    cfg = CONFIGS[name]
    cfg.validate(MODEL)
    moe = build(cfg, seed=1, random_bias=True)
    x = torch.randn(3, 7, DIM, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 7, DIM, dtype=torch.float64)
    y = moe(x)
    (y * g).sum().backward()

    p = naive_params(moe)
    x_ref = x.detach().clone().requires_grad_()
    y_ref, _, kept = naive_moe(x_ref.view(-1, DIM), p, cfg)
    (y_ref.view_as(g) * g).sum().backward()

    assert_close64(y, y_ref.view_as(y), "output")
    assert_close64(x.grad, x_ref.grad, "grad x")
    for n, param in moe.named_parameters():
        assert param.grad is not None, n
        assert_close64(param.grad, p[PARAM_NAMES[n]].grad, f"grad {n}")
    dropped = 3 * 7 * cfg.experts_per_token - len(kept)
    assert moe.last_stats.dropped_tokens.item() == dropped
    if cfg.capacity_factor > 0:
        assert dropped > 0  # the case must actually exercise the drop rule


def test_shared_expert_width():
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden=7, n_shared_experts=2)
    assert MoE(DIM, MODEL, moe).shared_experts.w1.weight.shape == (14, DIM)  # 0: n_shared x expert_hidden
    assert MoE(DIM, MODEL, replace(moe, shared_expert_hidden=13)).shared_experts.w1.weight.shape == (13, DIM)
    for bad in (replace(moe, shared_expert_hidden=-1), replace(moe, n_shared_experts=0, shared_expert_hidden=13)):
        with pytest.raises(ConfigError, match="moe.shared_expert_hidden"):
            bad.validate(MODEL)


# ------------------------------------------------------------------------------------------
# Dispatcher alone.


def dispatch_roundtrip(dispatcher, x_TD, idx_Tk, w_Tk, expert_scale_E):
    """dispatch -> per-expert map y = weight * scale[e] * tanh(x) -> combine."""
    x_perm, w_perm, counts, ctx = dispatcher.dispatch(x_TD, idx_Tk, w_Tk)
    expert_of_row = torch.repeat_interleave(torch.arange(len(counts)), counts)
    y_perm = (w_perm * expert_scale_E[expert_of_row]).unsqueeze(1) * torch.tanh(x_perm)
    return dispatcher.combine(y_perm, ctx), counts, x_perm, expert_of_row


def random_assignments(T, E, k, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g)
    return idx, w


@pytest.mark.parametrize(
    "factor,policy", [(0.0, "probability"), (0.8, "probability"), (0.8, "position"), (1.3, "position")]
)
def test_dispatch_combine_matches_per_token_loop(factor, policy):
    T, E, k, D = 23, 5, 2, 6
    idx, w = random_assignments(T, E, k, seed=int(factor * 10))
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    w = w.double().requires_grad_()
    scale = torch.randn(E, dtype=torch.float64)
    dispatcher = LocalDispatcher(E, factor, policy)
    y, counts, x_perm, expert_of_row = dispatch_roundtrip(dispatcher, x, idx, w, scale)

    cfg = MoEConfig(num_experts=E, top_k=k, capacity_factor=factor, drop_policy=policy)
    kept = naive_keep([(idx[t].tolist(), w[t].detach()) for t in range(T)], cfg)
    keep_mask = dispatcher.keep_mask(idx, w)
    assert {(t, j) for t in range(T) for j in range(k) if keep_mask[t, j]} == kept
    x_ref = x.detach().clone().requires_grad_()
    w_ref = w.detach().clone().requires_grad_()
    y_ref = torch.stack(
        [
            sum(
                (w_ref[t, j] * scale[idx[t, j]] * torch.tanh(x_ref[t]) for j in range(k) if (t, j) in kept),
                torch.zeros(D, dtype=torch.float64),
            )
            for t in range(T)
        ]
    )
    assert_close64(y, y_ref, "combine")
    g = torch.randn(T, D, dtype=torch.float64)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    assert_close64(x.grad, x_ref.grad, "grad x")
    assert_close64(w.grad, w_ref.grad, "grad weights")

    # Rows are grouped by expert, tokens in order within each expert.
    assert counts.sum().item() == len(kept) and x_perm.shape[0] == len(kept)
    rows = sorted(kept, key=lambda a: (idx[a[0], a[1]].item(), a[0]))
    assert torch.equal(x_perm, x.detach()[[t for t, _ in rows]])
    assert expert_of_row.tolist() == [idx[t, j].item() for t, j in rows]
    if factor > 0:
        capacity = math.ceil(factor * T * k / E)
        assert counts.max().item() <= capacity


def test_capacity_drops_exactly_the_expected_assignments():
    # 4 tokens, 2 experts, top-2, capacity ceil(0.5 * 4 * 2 / 2) = 2 per expert.
    idx = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]])
    w = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1], [0.8, 0.2]])
    # Expert 0 sees t0 .6, t1 .7, t2 .1, t3 .8; expert 1 sees t0 .4, t1 .3, t2 .9, t3 .2.
    by_probability = LocalDispatcher(2, 0.5, "probability").keep_mask(idx, w)
    assert by_probability.tolist() == [[False, True], [True, False], [True, False], [True, False]]
    by_position = LocalDispatcher(2, 0.5, "position").keep_mask(idx, w)
    assert by_position.tolist() == [[True, True], [True, True], [False, False], [False, False]]
    x = torch.randn(4, 3)
    y, counts, _, _ = dispatch_roundtrip(LocalDispatcher(2, 0.5, "position"), x, idx, w, torch.ones(2))
    assert counts.tolist() == [2, 2]
    assert torch.equal(y[2:], torch.zeros(2, 3))


def test_probability_ties_keep_the_earlier_assignment():
    idx = torch.zeros(4, 1, dtype=torch.long)
    w = torch.tensor([[0.5], [0.5], [0.9], [0.5]])
    keep = LocalDispatcher(2, 0.5, "probability").keep_mask(idx, w)  # capacity ceil(0.5 * 4 / 2) = 1
    assert keep.view(-1).tolist() == [False, False, True, False]
    keep = LocalDispatcher(2, 1.0, "probability").keep_mask(idx, w)  # capacity 2
    assert keep.view(-1).tolist() == [True, False, True, False]


@pytest.mark.parametrize("factor", [0.0, 0.8])
def test_bf16_sum_and_token_gradient_round_once(factor):
    """bf16 rows are summed in fp32 and rounded once: each output, and each token's
    gradient (the sum of its rows'), is the exact value correctly rounded to bf16, up to fp32's
    own error (at most 16 fp32 ulps of the summed magnitudes) where it lies near a rounding tie."""
    T, E, k, D = 57, 8, 4, 33
    idx, w = random_assignments(T, E, k, seed=11)
    x = torch.randn(T, D, dtype=torch.bfloat16, requires_grad=True)
    dispatcher = LocalDispatcher(E, factor, "position")
    x_perm, _, _, ctx = dispatcher.dispatch(x, idx, w)
    y_perm = torch.randn(x_perm.shape, dtype=torch.bfloat16)
    grad_perm = torch.randn(x_perm.shape, dtype=torch.bfloat16)
    y = dispatcher.combine(y_perm, ctx)
    x_perm.backward(grad_perm)

    def exact_sum(rows):
        terms = torch.cat([rows.double(), torch.zeros(1, D, dtype=torch.float64)])[ctx.slot_Tk]
        return terms.sum(dim=1), terms.abs().sum(dim=1)

    half_ulp = torch.finfo(torch.bfloat16).eps / 2
    eps32 = torch.finfo(torch.float32).eps
    for name, actual, (ref, magnitude) in (
        ("sum", y, exact_sum(y_perm)),
        ("token gradient", x.grad, exact_sum(grad_perm)),
    ):
        assert actual.dtype == torch.bfloat16
        excess = (actual.double() - ref).abs() - half_ulp * ref.abs() - 16 * eps32 * magnitude
        assert excess.max().item() <= 0, f"{name}: more than half a bf16 ulp off the exact sum"
    assert (ctx.dropped > 0) == (factor > 0)


class PaddedAutogradDispatcher(LocalDispatcher):
    """The dispatcher's math as it was before combine and the dispatch backward were fused and
    the experts took the routing weights: unweighted experts, then plain autograd over
    [T, k, D] gathers from a copy padded with a zero row, weighted and summed in fp32."""

    def dispatch(self, x_TD, indices_Tk, weights_Tk):
        _, _, counts, ctx = super().dispatch(x_TD.detach(), indices_Tk, weights_Tk.detach())
        ctx.weights_Tk = weights_Tk
        return x_TD[ctx.token_N], None, counts, ctx

    def combine(self, y_ND, ctx):
        padded = torch.cat([y_ND, y_ND.new_zeros(1, y_ND.shape[1])])
        y_TkD = padded[ctx.slot_Tk]
        dtype = torch.promote_types(y_ND.dtype, ctx.weights_Tk.dtype)
        return (y_TkD.to(dtype) * ctx.weights_Tk.to(dtype).unsqueeze(-1)).sum(dim=1).to(y_ND.dtype)


@pytest.mark.parametrize("precision", ["fp32", "bf16_autocast", "bf16"])
@pytest.mark.parametrize("capacity", [0.0, 0.7])
def test_weighting_inside_the_experts_equals_weighting_their_outputs(precision, capacity):
    """The layer as it is (routing weights scale the experts' hidden activation, then an
    unweighted sum) against the math before (unweighted experts, padded [T, k, D] gathers,
    weighted in fp32): outputs and every gradient within the dtype's error of the old math in
    fp64 (MULTIPLE x the old math's own error at the dtype)."""
    cfg = MoEConfig(num_experts=16, top_k=4, expert_hidden=24, n_shared_experts=1, capacity_factor=capacity)
    model = ModelConfig(dim=40, ffn_hidden=48)
    torch.manual_seed(int(capacity * 10) + len(precision))
    fused = MoE(40, model, cfg)
    fused.init_weights(0.3, 0.2)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    fused.to(dtype)
    padded = copy.deepcopy(fused)
    padded.dispatcher = PaddedAutogradDispatcher(16, capacity)
    exact = copy.deepcopy(padded).to(torch.float64)
    x = torch.randn(2, 97, 40).to(dtype)
    g = torch.randn(2, 97, 40, dtype=torch.float64)
    results = []
    for moe in (fused, padded, exact):
        xi = x.to(next(moe.parameters()).dtype, copy=True).requires_grad_()
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16_autocast" and moe is not exact):
            y = moe(xi)
        (y.double() * g).sum().backward()
        results.append([y, xi.grad] + [q.grad for q in moe.parameters()])
        assert (moe.last_stats.dropped_tokens > 0) == (capacity > 0)
    names = ["output", "grad x"] + [n for n, _ in fused.named_parameters()]
    for name, got, old, ref in zip(names, *results, strict=True):
        assert_within_dtype_error(name, got.detach(), ref.detach(), old.detach())


# ------------------------------------------------------------------------------------------
# Layer properties.


def test_aux_and_z_loss_gradients_are_injected():
    cfg = MoEConfig(num_experts=8, top_k=2, aux_loss_coeff=0.3, z_loss_coeff=0.05, aux_loss_level="sequence")
    moe = build(cfg, seed=2)
    moe.aux_loss_scale = 0.25
    x = torch.randn(2, 9, DIM, dtype=torch.float64)

    x1 = x.clone().requires_grad_()
    moe(x1).sum().backward()
    injected = {n: q.grad.clone() for n, q in moe.named_parameters()}

    # The same losses added explicitly to a twin whose layer attaches nothing.
    twin = copy.deepcopy(moe)
    twin.moe_cfg = replace(cfg, aux_loss_coeff=0.0, z_loss_coeff=0.0)
    twin.zero_grad()
    x2 = x.clone().requires_grad_()
    route = twin.router(x2.view(-1, DIM))
    aux = load_balancing_loss(route.scores_TE, route.indices_Tk, 0.3, level="sequence", seq_len=9)
    z = router_z_loss(route.logits_TE, 0.05)
    (twin(x2).sum() + 0.25 * (aux + z)).backward()
    for n, q in twin.named_parameters():
        assert_close64(injected[n], q.grad, n)
    assert_close64(x1.grad, x2.grad, "grad x")

    # ...and they really moved the router's gradient.
    twin.zero_grad()
    twin(x.clone().requires_grad_()).sum().backward()
    assert (injected["router.gate.weight"] - twin.router.gate.weight.grad).abs().max() > 1e-6
    assert moe.last_stats.aux_loss.item() == pytest.approx(aux.item())
    assert moe.last_stats.z_loss.item() == pytest.approx(z.item())


def test_no_loss_attached_under_no_grad():
    moe = build(MoEConfig(num_experts=4, top_k=2, aux_loss_coeff=0.1), dtype=torch.float32)
    with torch.no_grad():
        y = moe(torch.randn(2, 3, DIM))
    assert not y.requires_grad and moe.last_stats.aux_loss > 0


def test_bitwise_deterministic():
    cfg = CONFIGS["deepseek"]
    moe = build(cfg, seed=3, dtype=torch.float32)
    x = torch.randn(4, 11, DIM)
    results = []
    for _ in range(2):
        xi = x.clone().requires_grad_()
        moe.zero_grad()
        y = moe(xi)
        y.pow(2).sum().backward()
        results.append([y.detach(), xi.grad] + [q.grad.clone() for q in moe.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_checkpointed_layer_equals_plain():
    cfg = replace(CONFIGS["capacity_probability"], aux_loss_coeff=0.1, z_loss_coeff=0.01)
    moe = build(cfg, seed=4, dtype=torch.float32)
    x = torch.randn(2, 8, DIM)
    grads = []
    for use_ckpt in (False, True):
        xi = x.clone().requires_grad_()
        moe.zero_grad()
        y = checkpoint(moe, xi, use_reentrant=False) if use_ckpt else moe(xi)
        y.sum().backward()
        grads.append([y.detach(), xi.grad] + [q.grad.clone() for q in moe.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_meta_build_then_init_gives_finite_nonzero_weights():
    cfg = CONFIGS["deepseek"]
    with torch.device("meta"):
        moe = MoE(DIM, MODEL, cfg)
    assert moe.experts.w13.is_meta and moe.router.expert_bias.is_meta
    moe.to_empty(device="cpu")
    torch.manual_seed(5)
    moe.init_weights(0.02, 0.005)
    for n, q in moe.named_parameters():
        assert torch.isfinite(q).all() and (q != 0).any(), n
    assert moe.experts.w13.std().item() == pytest.approx(0.02, rel=0.2)
    assert moe.experts.w2.std().item() == pytest.approx(0.005, rel=0.2)
    assert torch.equal(moe.router.expert_bias, torch.zeros(cfg.routed_experts))
    assert torch.equal(moe.tokens_per_expert_acc, torch.zeros(cfg.routed_experts, dtype=torch.int64))
    assert "expert_bias" in "".join(moe.state_dict()) and "tokens_per_expert_acc" not in "".join(moe.state_dict())
    y = moe(torch.randn(2, 5, DIM))
    assert torch.isfinite(y).all()


def test_bf16_layer_close_to_fp64_reference():
    cfg = CONFIGS["deepseek"]
    moe = build(cfg, seed=6, dtype=torch.bfloat16)
    x = torch.randn(2, 10, DIM, dtype=torch.bfloat16)
    y = moe(x)
    assert y.dtype == torch.bfloat16
    p = {k: v.double() for k, v in naive_params(moe).items()}
    y_ref, _, _ = naive_moe(x.double().view(-1, DIM), p, cfg)
    # Each of the three GEMMs of a SwiGLU rounds its output to bf16.
    tol = 16 * torch.finfo(torch.bfloat16).eps * y_ref.abs().max().item()
    assert (y.double().view(-1, DIM) - y_ref).abs().max().item() <= tol


def test_torch_grouped_mm_backend_matches_loop():
    cfg = MoEConfig(num_experts=8, top_k=2, expert_hidden=8, n_shared_experts=1)
    model = ModelConfig(dim=16, ffn_hidden=32)
    torch.manual_seed(7)
    loop = MoE(16, model, replace(cfg, expert_backend="loop"))
    loop.init_weights(0.3, 0.2)
    fused = MoE(16, model, replace(cfg, expert_backend="grouped_mm"))
    fused.load_state_dict(loop.state_dict())
    x = torch.randn(3, 7, 16)
    outs = []
    for moe in (loop, fused):
        xi = x.clone().requires_grad_()
        y = moe(xi)
        y.sum().backward()
        outs.append([y.detach(), xi.grad] + [q.grad for q in moe.parameters()])
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sequence_level_aux_uses_the_layer_sequence_length():
    cfg = MoEConfig(num_experts=8, top_k=2, aux_loss_coeff=1.0, aux_loss_level="sequence")
    moe = build(cfg, seed=8)
    x = torch.randn(3, 5, DIM, dtype=torch.float64)
    moe(x)
    route = moe.router(x.view(-1, DIM))
    expected = load_balancing_loss(route.scores_TE, route.indices_Tk, 1.0, level="sequence", seq_len=5)
    assert moe.last_stats.aux_loss.item() == pytest.approx(expected.item(), rel=1e-12)


def test_expert_bias_survives_a_model_cast_exactly():
    cfg = CONFIGS["deepseek"]
    moe = build(cfg, seed=9, dtype=torch.float32, random_bias=True)
    bias = moe.router.expert_bias.clone()
    assert (bias.bfloat16().float() != bias).all()
    model = torch.nn.Sequential(moe).to(torch.bfloat16)
    assert moe.experts.w13.dtype == torch.bfloat16
    assert moe.router.expert_bias.dtype == torch.float32 and torch.equal(moe.router.expert_bias, bias)
    assert moe.tokens_per_expert_acc.dtype == torch.int64
    y = model(torch.randn(2, 5, DIM, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    model.double()
    assert moe.router.expert_bias.dtype == torch.float32 and torch.equal(moe.router.expert_bias, bias)
