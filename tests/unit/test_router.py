"""Router math against hand-computed cases.

Each case routes 2 tokens. The gate is the identity, so a token's input row is its logits;
logits are written as log(p) (softmax scores = p) or logit(p) (sigmoid scores = p), which
makes every expected score and weight a number one can check by hand.

Shape legend: T tokens, E experts, k experts per token.
"""

from __future__ import annotations

import math

import pytest
import torch

from sparsetron.model.config import MoEConfig
from sparsetron.model.moe.router import Router

ATOL = 8 * torch.finfo(torch.float32).eps  # a softmax or a division of fp32 numbers near 1


def make_router(E, k, bias=None, **cfg):
    router = Router(E, MoEConfig(num_experts=E, top_k=k, **cfg))
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(E))
        if bias is not None:
            router.expert_bias.copy_(torch.tensor(bias))
    return router


def log_p(*rows):
    return torch.tensor([[math.log(p) for p in row] for row in rows])


def logit_p(*rows):
    return torch.tensor([[math.log(p / (1 - p)) for p in row] for row in rows])


def check(router, x, indices, weights):
    out = router(x)
    assert out.indices_Tk.tolist() == indices
    assert out.weights_Tk.dtype == torch.float32
    torch.testing.assert_close(out.weights_Tk, torch.tensor(weights), atol=ATOL, rtol=0)
    return out


P_SOFTMAX = ([0.4, 0.3, 0.2, 0.1], [0.1, 0.25, 0.15, 0.5])


def test_softmax_then_topk():
    out = check(make_router(4, 2), log_p(*P_SOFTMAX), [[0, 1], [3, 1]], [[0.4, 0.3], [0.5, 0.25]])
    torch.testing.assert_close(out.scores_TE, torch.tensor(P_SOFTMAX), atol=ATOL, rtol=0)


def test_softmax_then_topk_normalised():
    check(make_router(4, 2, norm_topk_prob=True), log_p(*P_SOFTMAX), [[0, 1], [3, 1]], [[4 / 7, 3 / 7], [2 / 3, 1 / 3]])


def test_softmax_then_topk_normalised_and_scaled():
    router = make_router(4, 2, norm_topk_prob=True, route_scale=2.5)
    check(router, log_p(*P_SOFTMAX), [[0, 1], [3, 1]], [[10 / 7, 7.5 / 7], [5 / 3, 2.5 / 3]])


def test_softmax_then_topk_scaled_without_normalisation():
    check(make_router(4, 2, route_scale=3.0), log_p(*P_SOFTMAX), [[0, 1], [3, 1]], [[1.2, 0.9], [1.5, 0.75]])


LOGITS = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 3.0, -2.0, 2.5]])


def test_topk_then_softmax():
    # Softmax over the two chosen logits only: [2, 1] -> e/(e+1); [3, 2.5] -> 1/(1+e^-0.5).
    a, b = math.e / (math.e + 1), 1 / (1 + math.exp(-0.5))
    router = make_router(4, 2, route_order="topk_then_softmax")
    check(router, LOGITS, [[0, 1], [1, 3]], [[a, 1 - a], [b, 1 - b]])
    # Scale applies after; normalisation changes nothing (already sums to 1).
    router = make_router(4, 2, route_order="topk_then_softmax", norm_topk_prob=True, route_scale=2.0)
    check(router, LOGITS, [[0, 1], [1, 3]], [[2 * a, 2 - 2 * a], [2 * b, 2 - 2 * b]])


def test_topk_then_softmax_differs_from_softmax_then_topk():
    # Without normalisation softmax_then_topk keeps the full-softmax mass, which is smaller.
    a = math.e / (math.e + 1)
    full = torch.softmax(LOGITS[0].double(), 0)
    assert abs(full[0].item() - a) > 0.1
    check(make_router(4, 2), LOGITS[:1], [[0, 1]], [[full[0].item(), full[1].item()]])


P_SIGMOID = ([0.9, 0.2, 0.6, 0.5], [0.3, 0.8, 0.1, 0.7])


@pytest.mark.parametrize("order", ["softmax_then_topk", "topk_then_softmax"])
def test_sigmoid_normalised(order):
    router = make_router(4, 2, score_func="sigmoid", norm_topk_prob=True, route_order=order)
    out = check(router, logit_p(*P_SIGMOID), [[0, 2], [1, 3]], [[0.6, 0.4], [8 / 15, 7 / 15]])
    torch.testing.assert_close(out.scores_TE, torch.tensor(P_SIGMOID), atol=ATOL, rtol=0)


def test_sigmoid_normalised_and_scaled():
    router = make_router(4, 2, score_func="sigmoid", norm_topk_prob=True, route_scale=2.0)
    check(router, logit_p(*P_SIGMOID), [[0, 2], [1, 3]], [[1.2, 0.8], [16 / 15, 14 / 15]])


def test_sigmoid_without_normalisation_gives_raw_scores():
    router = make_router(4, 2, score_func="sigmoid")
    check(router, logit_p(*P_SIGMOID), [[0, 2], [1, 3]], [[0.9, 0.6], [0.8, 0.7]])


def test_group_limited_pairs():
    # 4 groups of 2, best 2 groups. Token 0: group sums 0.31, 0.27, 0.35, 0.07 -> groups 2 and 0,
    # so expert 4 (0.20) beats the globally better expert 2 (0.25) of group 1.
    # Token 1: sums 0.27, 0.40, 0.10, 0.23 -> groups 1 and 0 -> experts 3, 0.
    probs = ([0.30, 0.01, 0.25, 0.02, 0.20, 0.15, 0.04, 0.03], [0.26, 0.01, 0.10, 0.30, 0.02, 0.08, 0.12, 0.11])
    router = make_router(8, 2, n_groups=4, topk_groups=2)
    check(router, log_p(*probs), [[0, 4], [3, 0]], [[0.30, 0.20], [0.30, 0.26]])
    check(make_router(8, 2), log_p(*probs), [[0, 2], [3, 0]], [[0.30, 0.25], [0.30, 0.26]])


def test_group_score_is_sum_of_top_two():
    # 2 groups of 3, best 1. Token 0: top-2 sums 0.45 vs 0.36 pick group 0 (full sums 0.46 vs 0.54
    # would pick group 1). Token 1: top-2 sums 0.30 vs 0.45 pick group 1 (maxima 0.25 vs 0.23 would pick 0).
    probs = ([0.30, 0.15, 0.01, 0.18, 0.18, 0.18], [0.25, 0.05, 0.04, 0.22, 0.21, 0.23])
    router = make_router(6, 2, n_groups=2, topk_groups=1)
    check(router, log_p(*probs), [[0, 1], [5, 3]], [[0.30, 0.15], [0.23, 0.22]])


def test_group_limited_sigmoid_deepseek_style():
    # Sigmoid, 4 groups of 2, best 2, normalised, scale 2.5. Token 0 group sums 1.0, 1.5, 1.25, 0.5
    # -> groups 1, 2 -> experts 2 (0.8), 3 (0.7); expert 0 (0.9) is excluded.
    p = ([0.9, 0.1, 0.8, 0.7, 0.6, 0.65, 0.2, 0.3], [0.55, 0.5, 0.1, 0.2, 0.3, 0.25, 0.15, 0.95])
    # Token 1 group sums 1.05, 0.3, 0.55, 1.1 -> groups 3, 0 -> experts 7 (0.95), 0 (0.55).
    router = make_router(8, 2, n_groups=4, topk_groups=2, score_func="sigmoid", norm_topk_prob=True, route_scale=2.5)
    check(router, logit_p(*p), [[2, 3], [7, 0]], [[2.5 * 8 / 15, 2.5 * 7 / 15], [2.5 * 0.95 / 1.5, 2.5 * 0.55 / 1.5]])


def test_group_limited_topk_then_softmax_scores_groups_on_logits():
    # 2 groups of 2, best 1; logits [3, -2 | 1, 1.5]: group sums 1.0 vs 2.5 -> group 1, softmax([1.5, 1]).
    x = torch.tensor([[3.0, -2.0, 1.0, 1.5]])
    b = 1 / (1 + math.exp(-0.5))
    router = make_router(4, 2, n_groups=2, topk_groups=1, route_order="topk_then_softmax")
    check(router, x, [[3, 2]], [[b, 1 - b]])


def test_bias_changes_selection_not_weights_softmax():
    # Biased scores of token 0: [0.4, 0.3, 0.35, 0.1] -> experts 0 and 2; weights stay 0.4 and 0.2.
    router = make_router(4, 2, bias=[0.0, 0.0, 0.15, 0.0])
    check(router, log_p(*P_SOFTMAX), [[0, 2], [3, 2]], [[0.4, 0.2], [0.5, 0.15]])


def test_bias_changes_selection_not_weights_topk_then_softmax():
    # The bias shifts logits for selection: [2, 1, 1.1, -1] -> experts 0, 2; weights softmax([2, 0.5]).
    a = 1 / (1 + math.exp(-1.5))
    router = make_router(4, 2, bias=[0.0, 0.0, 0.6, 0.0], route_order="topk_then_softmax")
    check(router, LOGITS[:1], [[0, 2]], [[a, 1 - a]])


def test_bias_changes_selection_not_weights_sigmoid():
    # Biased [0.9, 0.7, 0.6, 0.5] -> experts 0, 1; weights the unbiased 0.9 and 0.2, normalised.
    router = make_router(4, 2, bias=[0.0, 0.5, 0.0, 0.0], score_func="sigmoid", norm_topk_prob=True)
    check(router, logit_p(P_SIGMOID[0]), [[0, 1]], [[0.9 / 1.1, 0.2 / 1.1]])


@pytest.mark.parametrize("order", ["softmax_then_topk", "topk_then_softmax"])
def test_random_bias_moves_selection_but_weights_are_unbiased_scores(order):
    torch.manual_seed(0)
    E, k, T = 16, 4, 64
    router = Router(8, MoEConfig(num_experts=E, top_k=k, route_order=order))
    x = torch.randn(T, 8)
    before = router(x)
    with torch.no_grad():
        router.expert_bias.copy_(torch.randn(E) * 0.5)
    after = router(x)
    assert not torch.equal(before.indices_Tk, after.indices_Tk)
    torch.testing.assert_close(after.scores_TE, before.scores_TE, rtol=0, atol=0)
    if order == "softmax_then_topk":
        expected = after.scores_TE.gather(1, after.indices_Tk)
    else:
        expected = torch.softmax(after.logits_TE.gather(1, after.indices_Tk), dim=-1)
    torch.testing.assert_close(after.weights_Tk, expected, rtol=0, atol=0)


def test_router_math_is_fp32_under_bf16_and_autocast():
    torch.manual_seed(1)
    router = Router(16, MoEConfig(num_experts=8, top_k=2)).to(torch.bfloat16)
    assert router.expert_bias.dtype == torch.float32  # never rounded with the model
    x = torch.randn(10, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = router(x)
    for t in (out.weights_Tk, out.scores_TE, out.logits_TE):
        assert t.dtype == torch.float32
    ref_logits = x.double() @ router.gate.weight.double().T
    torch.testing.assert_close(out.logits_TE.double(), ref_logits, rtol=1e-6, atol=1e-6)


def test_router_gradient_reaches_gate():
    torch.manual_seed(2)
    router = Router(8, MoEConfig(num_experts=6, top_k=2, norm_topk_prob=True))
    out = router(torch.randn(5, 8))
    out.weights_Tk.pow(2).sum().backward()
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("cast", ["bfloat16", "half", "double"])
def test_expert_bias_stays_exact_fp32_through_dtype_casts(cast):
    E = 12
    router = Router(16, MoEConfig(num_experts=E, top_k=2))
    with torch.no_grad():
        router.expert_bias.copy_(torch.randn(E) * 1e-2)
    bias = router.expert_bias.clone()
    target = {"bfloat16": torch.bfloat16, "half": torch.float16, "double": torch.float64}[cast]
    if target != torch.float64:
        assert (bias.to(target).float() != bias).all()  # a round trip through target would show
    moved = router.to(torch.bfloat16) if cast == "bfloat16" else getattr(router, cast)()
    assert moved is router and router.gate.weight.dtype == target  # the cast did happen
    assert router.expert_bias.dtype == torch.float32
    assert torch.equal(router.expert_bias, bias)
    assert "expert_bias" in dict(router.named_buffers())
    out = router(torch.randn(5, 16, dtype=target))
    assert out.weights_Tk.dtype == torch.promote_types(target, torch.float32)


def test_expert_bias_fp32_after_meta_cast_and_materialisation():
    with torch.device("meta"):
        router = Router(16, MoEConfig(num_experts=8, top_k=2))
    router.to(torch.bfloat16)
    assert router.expert_bias.is_meta and router.expert_bias.dtype == torch.float32
    router.to_empty(device="cpu")
    router.init_weights(0.02)
    assert router.gate.weight.dtype == torch.bfloat16
    assert router.expert_bias.dtype == torch.float32 and torch.equal(router.expert_bias, torch.zeros(8))
