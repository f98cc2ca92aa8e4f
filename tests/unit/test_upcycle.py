"""Upcycling preserves the dense model's function (../shared/specs/upcycling.md), and every
setting that cannot is refused by name, or accepted with a warning when asked to."""

import warnings

import pytest
import torch

from sparsetron.model.config import AttentionConfig, ModelConfig, MoEConfig
from sparsetron.model.transformer import Transformer
from sparsetron.model.upcycle import UpcycleError, UpcycleWarning, plan_upcycle, upcycle

VOCAB, DIM, FFN = 96, 32, 64
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def model_cfg(**kw):
    return ModelConfig(**{"vocab_size": VOCAB, "dim": DIM, "n_layers": 3, "ffn_hidden": FFN, "max_seq_len": 64, **kw})


ATTN = AttentionConfig(n_heads=4, n_kv_heads=2)


def build(moe=None, seed=0, dtype=torch.float32, model=None):
    torch.manual_seed(seed)
    net = Transformer(model or model_cfg(), ATTN, moe)
    net.init_weights()
    return net.to(dtype)


def dense_model(dtype=torch.float32):
    net = build(None, seed=0, dtype=dtype)
    # Non-trivial norms, so that copying them (not re-initialising them) is what the test sees.
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return net


def rel_error(moe_cfg, dtype, **kwargs):
    dense = dense_model(dtype)
    moe = build(moe_cfg, seed=1, dtype=dtype)
    plan = upcycle(dense, moe, **kwargs)
    tokens = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = dense(tokens), moe(tokens)
    return ((got - want).norm() / want.norm()).item(), plan


SHARED = {"none": {}, "shared": {"n_shared_experts": 1}, "gated": {"n_shared_experts": 1, "shared_expert_gate": True}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize(
    "shared,first_k_dense",
    [("none", 0), ("none", 1), ("shared", 1), ("gated", 0)],
    ids=["moe", "mixed", "shared-mixed", "gated"],
)
@pytest.mark.parametrize("order", ["topk_then_softmax", "softmax_then_topk"])
@pytest.mark.parametrize("G", [1, 2, 4])
def test_function_is_preserved(G, order, shared, first_k_dense, dtype):
    # 4 copies of the dense FFN in G shards each; one copy (k = G experts) per token.
    cfg = MoEConfig(num_experts=4, top_k=1, granularity=G, route_order=order, first_k_dense=first_k_dense)
    for key, value in SHARED[shared].items():
        setattr(cfg, key, value)
    cfg.validate(model_cfg())
    err, plan = rel_error(cfg, dtype)
    assert plan.shards == G and plan.experts == 4 * G and plan.experts_per_token == G and not plan.inexact
    # The spec's exact settings: virtual groups for topk-then-softmax, a zero router for softmax-then-topk.
    assert plan.router == ("virtual_groups" if order == "topk_then_softmax" else "zero")
    assert plan.scale == (G if order == "topk_then_softmax" else 4 * G * G / G)
    assert plan.dense_layers == list(range(first_k_dense))
    assert err <= TOL[dtype], err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize(
    "case",
    [
        # Two whole copies per token, so the softmax over the selected copies matters.
        {"num_experts": 4, "top_k": 2, "granularity": 2, "route_order": "topk_then_softmax", "n_shared_experts": 1},
        # G from expert_hidden, not granularity: 8 experts of 32 = 4 copies of 2 shards.
        {"num_experts": 8, "top_k": 2, "expert_hidden": 32, "route_order": "topk_then_softmax"},
        {"num_experts": 8, "top_k": 2, "expert_hidden": 32, "route_order": "softmax_then_topk"},
        # softmax-then-topk renormalised: a random virtual-group router is exact too.
        {"num_experts": 4, "top_k": 1, "granularity": 4, "norm_topk_prob": True, "route_scale": 2.5},
        # DeepSeek-style: sigmoid scores, group-limited routing (one copy per group), route scale.
        {
            "num_experts": 4,
            "top_k": 1,
            "granularity": 4,
            "score_func": "sigmoid",
            "norm_topk_prob": True,
            "route_scale": 2.5,
            "n_groups": 4,
            "topk_groups": 2,
            "n_shared_experts": 2,
            "first_k_dense": 1,
            "bias_update_rate": 0.001,
            "aux_loss_coeff": 0.01,
        },
        # Shared experts as wide as the dense FFN.
        {"num_experts": 4, "top_k": 1, "granularity": 2, "n_shared_experts": 2, "shared_expert_gate": True},
        # A shared width no multiple of the expert's (24 units of 16-unit shards): it cuts shard 1.
        {
            "num_experts": 4,
            "top_k": 1,
            "granularity": 4,
            "n_shared_experts": 1,
            "shared_expert_hidden": 24,
            "shared_expert_gate": True,
            "route_order": "topk_then_softmax",
        },
        # Routing before attention: every copy still sums to the dense FFN, whichever is chosen.
        {
            "num_experts": 4,
            "top_k": 2,
            "granularity": 2,
            "route_order": "topk_then_softmax",
            "n_shared_experts": 1,
            "router_input": "pre_attention",
        },
        {"num_experts": 4, "top_k": 1, "granularity": 2, "router_input": "pre_attention"},
    ],
    ids=[
        "two-copies",
        "expert-hidden",
        "expert-hidden-zero",
        "renormalised",
        "deepseek",
        "wide-shared",
        "any-width-shared",
        "pre-attention",
        "pre-attention-zero",
    ],
)
def test_function_is_preserved_in_other_settings(case, dtype):
    cfg = MoEConfig(**case)
    cfg.validate(model_cfg())
    err, plan = rel_error(cfg, dtype)
    assert not plan.inexact
    assert err <= TOL[dtype], err


@pytest.mark.parametrize("fraction", [0.25, 1.0])
def test_shared_fraction_keeps_the_function(fraction):
    cfg = MoEConfig(num_experts=4, top_k=1, granularity=4, n_shared_experts=1, route_order="topk_then_softmax")
    err, plan = rel_error(cfg, torch.float64, shared_fraction=fraction)
    assert plan.shared_fraction == fraction and err <= 1e-10


def test_layout_of_the_experts():
    """Expert c*G + j holds shard j of the dense FFN, gate and up sliced separately; one copy's router rows agree."""
    G = 4
    cfg = MoEConfig(num_experts=2, top_k=1, granularity=G, route_order="topk_then_softmax", first_k_dense=1)
    dense, moe = dense_model(), build(cfg, seed=1)
    upcycle(dense, moe)
    f = FFN // G
    d_ffn, m_ffn = dense.layers["1"].feed_forward, moe.layers["1"].feed_forward
    for e in range(2 * G):
        j = e % G
        units = slice(j * f, (j + 1) * f)
        assert torch.equal(m_ffn.experts.w13[e][:, :f], d_ffn.w1.weight[units].t())
        assert torch.equal(m_ffn.experts.w13[e][:, f:], d_ffn.w3.weight[units].t())
        assert torch.equal(m_ffn.experts.w2[e], d_ffn.w2.weight[:, units].t() * G)
    rows = m_ffn.router.gate.weight
    assert torch.equal(rows[:G], rows[0].expand(G, -1)) and not torch.equal(rows[0], rows[G])
    # The dense layer is copied as it is.
    assert torch.equal(moe.layers["0"].feed_forward.w2.weight, dense.layers["0"].feed_forward.w2.weight)


def test_zero_router_selects_whole_copies_without_relying_on_ties():
    """Under a zero router the tie-break bias picks copy 0 whole, lowest copy first."""
    cfg = MoEConfig(num_experts=4, top_k=2, granularity=4)  # k = 8: two copies
    dense, moe = dense_model(), build(cfg, seed=1)
    plan = upcycle(dense, moe)
    assert plan.router == "zero" and plan.scale == 16 * 4 / 8
    router = moe.layers["0"].feed_forward.router
    out = router(torch.randn(10, DIM))
    assert torch.equal(out.indices_Tk.sort(dim=-1).values, torch.arange(8).expand(10, 8))
    assert torch.allclose(out.weights_Tk, torch.full((10, 8), 1 / 16))


# ---- refusals -------------------------------------------------------------------------------


def refusal(moe_cfg, match, model=None, **kwargs):
    with pytest.raises(UpcycleError, match=match):
        upcycle(dense_model(), build(moe_cfg, seed=1, model=model), **kwargs)


INEXACT = {
    "k-not-multiple-of-G": (
        {"num_experts": 8, "top_k": 1, "expert_hidden": 32, "route_order": "topk_then_softmax"},
        {},
        r"moe\.top_k: top_k x granularity = 1 experts per token is not a multiple of G = 2",
    ),
    "softmax-random-router": (
        {"num_experts": 4, "top_k": 1, "granularity": 2},
        {"router": "virtual_groups"},
        r"moe\.route_order: softmax_then_topk without norm_topk_prob and a random",
    ),
    "capacity": (
        {"num_experts": 4, "top_k": 1, "granularity": 2, "capacity_factor": 1.0},
        {},
        r"moe\.capacity_factor: 1\.0 limits each expert's tokens",
    ),
    "groups-split-copies": (
        {"num_experts": 6, "top_k": 1, "granularity": 4, "norm_topk_prob": True, "n_groups": 4, "topk_groups": 1},
        {},
        r"moe\.n_groups: groups of 6 experts do not nest with the copies of 4 shards",
    ),
}


@pytest.mark.parametrize("name", list(INEXACT))
def test_inexact_settings_are_refused_and_accepted_only_with_the_flag(name):
    case, kwargs, message = INEXACT[name]
    cfg = MoEConfig(**case)
    cfg.validate(model_cfg())
    refusal(cfg, message, **kwargs)
    with pytest.warns(UpcycleWarning, match=message):
        err, plan = rel_error(cfg, torch.float64, allow_inexact=True, **kwargs)
    assert len(plan.inexact) == 1
    if name != "capacity":  # a capacity limit may happen to drop nothing on 64 tokens
        assert err > 1e-3, err


def test_k_not_divisible_by_G_is_badly_wrong():
    """The known failure the refusal guards against: the MoE layer's output is far from the dense FFN's."""
    cfg = MoEConfig(num_experts=8, top_k=3, expert_hidden=16, route_order="topk_then_softmax")  # G = 4, k = 3
    dense, moe = dense_model(torch.float64), build(cfg, seed=1, dtype=torch.float64)
    with pytest.warns(UpcycleWarning, match=r"moe\.top_k"):
        upcycle(dense, moe, allow_inexact=True)
    x = torch.randn(2, 32, DIM, dtype=torch.float64)
    with torch.no_grad():
        want, got = dense.layers["1"].feed_forward(x), moe.layers["1"].feed_forward(x)
    assert (got - want).norm() / want.norm() > 0.2


@pytest.mark.parametrize(
    "case,match",
    [
        ({"num_experts": 4, "top_k": 1, "expert_hidden": 24}, r"moe\.expert_hidden: the dense FFN hidden size 64"),
        ({"num_experts": 6, "top_k": 1, "expert_hidden": 16}, r"moe\.num_experts: 6 routed experts .* G = .* = 4"),
        (
            {"num_experts": 4, "top_k": 1, "granularity": 4, "n_shared_experts": 5},
            r"moe\.n_shared_experts: the shared experts\' 80 hidden units",
        ),
        (
            {"num_experts": 4, "top_k": 1, "granularity": 4, "n_shared_experts": 1, "shared_expert_hidden": 72},
            r"moe\.shared_expert_hidden: the shared experts' 72 hidden units are more than the dense FFN's 64",
        ),
        ({"num_experts": 0}, r"moe\.num_experts: the target recipe is dense"),
    ],
    ids=["f-does-not-divide-F", "E-not-whole-copies", "shared-too-wide", "shared-width-too-wide", "dense-target"],
)
def test_impossible_shapes_are_refused_even_with_the_flag(case, match):
    refusal(MoEConfig(**case), match, allow_inexact=True)


def test_model_mismatches_are_named():
    cfg = MoEConfig(num_experts=4, top_k=1, granularity=2)
    refusal(cfg, r"model\.dim: dense model 32, MoE recipe 48", model=model_cfg(dim=48), allow_inexact=True)
    refusal(cfg, r"model\.ffn_hidden: dense model 64, MoE recipe 128", model=model_cfg(ffn_hidden=128))
    refusal(
        cfg,
        r"model\.norm_eps: dense model 1e-05, MoE recipe 1e-06 \(changes the function\)",
        model=model_cfg(norm_eps=1e-6),
    )
    with pytest.warns(UpcycleWarning, match="model.norm_eps"):
        upcycle(dense_model(), build(cfg, seed=1, model=model_cfg(norm_eps=1e-6)), allow_inexact=True)
    # init_std and max_seq_len do not change what the model computes.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        upcycle(dense_model(), build(cfg, seed=1, model=model_cfg(init_std=0.01, max_seq_len=128)))


def test_source_must_be_dense():
    cfg = MoEConfig(num_experts=4, top_k=1, granularity=2)
    with pytest.raises(UpcycleError, match=r"not dense: layers\.0, layers\.1, layers\.2 already hold MoE layers"):
        upcycle(build(cfg, seed=0), build(cfg, seed=1))


@pytest.mark.parametrize("order", ["topk_then_softmax", "softmax_then_topk"])
def test_a_zero_router_is_exact_with_normalised_weights_too(order):
    cfg = MoEConfig(num_experts=4, top_k=2, granularity=2, route_order=order, norm_topk_prob=True, route_scale=1.5)
    err, plan = rel_error(cfg, torch.float64, router="zero")
    assert plan.router == "zero" and plan.scale == 2 / 1.5 and err <= 1e-10


def test_scale_of_a_random_router_without_renormalisation_is_the_average_one():
    cfg = MoEConfig(num_experts=4, top_k=1, granularity=2)  # E = 8, k = 2, G = 2
    plan = plan_upcycle(model_cfg(), ATTN, model_cfg(), ATTN, cfg, router="virtual_groups", allow_inexact=True)
    assert plan.scale == 8 * 2 / 2 and len(plan.inexact) == 1
    plan = plan_upcycle(model_cfg(), ATTN, model_cfg(), ATTN, cfg, router="zero")
    assert plan.scale == 8 and not plan.inexact
    cfg.norm_topk_prob, cfg.route_scale = True, 2.0
    plan = plan_upcycle(model_cfg(), ATTN, model_cfg(), ATTN, cfg, router="zero")
    assert plan.scale == 2 / 2 and not plan.inexact


def test_plan_describes_itself():
    cfg = MoEConfig(num_experts=4, top_k=1, granularity=4, n_shared_experts=1, first_k_dense=1)
    plan = plan_upcycle(model_cfg(), ATTN, model_cfg(), ATTN, cfg)
    text = plan.describe()
    assert "G=4 shards per copy, E=16 experts = 4 copies, k=4 per token; router zero" in text
    assert "MoE layers [1, 2], dense layers [0]" in text
