"""The pre-attention router (moe.router_input=pre_attention, SmallThinker): each MoE block routes
on attention's input, attention_norm(x), and its experts compute on ffn_norm(h) as usual.
tests/distributed/test_layouts.py trains it at tp2 and ep2 against one process.

Shape legend: B batch, S sequence, D model dim.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from tolerance import assert_within_dtype_error
from torch import nn

from sparsetron.model.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig
from sparsetron.model.moe import MoE
from sparsetron.model.transformer import Transformer
from sparsetron.train.config_io import load_job_config

VOCAB = 64
MODEL = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=3, ffn_hidden=64, max_seq_len=64)
ATTN = AttentionConfig(n_heads=4, n_kv_heads=2)
# Both balancing losses, a gated shared expert and a dense first block: every path of the layer runs.
MOE = MoEConfig(
    num_experts=4,
    top_k=1,
    granularity=2,
    n_shared_experts=1,
    shared_expert_gate=True,
    first_k_dense=1,
    aux_loss_coeff=0.01,
    z_loss_coeff=0.001,
)
PRE = replace(MOE, router_input="pre_attention")


class NoAttention(nn.Module):
    """An attention sublayer that adds nothing to the residual stream: h = x exactly."""

    def forward(self, x_BSD: torch.Tensor, seq) -> torch.Tensor:
        return torch.zeros_like(x_BSD)


def build(moe_cfg: MoEConfig, dtype=torch.float32, seed=0) -> Transformer:
    """A small random model with random (not unit) norm weights."""
    torch.manual_seed(seed)
    model = Transformer(MODEL, ATTN, moe_cfg)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.to(dtype)


def with_router_input(model: Transformer, router_input: str) -> Transformer:
    """A copy of `model` whose MoE blocks route on `router_input`, with the same weights."""
    moe_cfg = replace(model.moe_cfg, router_input=router_input)
    twin = Transformer(model.model_cfg, model.attn_cfg, moe_cfg).to(model.output.weight.dtype)
    twin.load_state_dict(model.state_dict())
    return twin


def without_attention(model: Transformer) -> Transformer:
    """`model` with every attention sublayer adding nothing and both norms of a block equal."""
    for block in model.layers.values():
        block.attention = NoAttention()
        with torch.no_grad():
            block.attention_norm.weight.copy_(block.ffn_norm.weight)
    return model


def record_routing(model: Transformer) -> list:
    """Every router's outputs, in call order, appended to the returned list by forward hooks."""
    routes = []
    for block in model.layers.values():
        if isinstance(block.feed_forward, MoE):
            block.feed_forward.router.register_forward_hook(lambda m, args, out: routes.append(out))
    return routes


def run(model: Transformer, tokens_BS: torch.Tensor):
    """Routing, logits, each MoE layer's (aux, z) losses and the gradients of a random function of the logits."""
    model.zero_grad()
    routes = record_routing(model)
    logits = model(tokens_BS)
    probe = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (logits * probe.to(logits.dtype)).sum().backward()
    losses = [
        (float(block.feed_forward.last_stats.aux_loss), float(block.feed_forward.last_stats.z_loss))
        for block in model.layers.values()
        if isinstance(block.feed_forward, MoE)
    ]
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return routes, logits.detach(), losses, grads


def norms_summed(grads: dict) -> dict:
    """`grads` with each block's two norm-weight gradients replaced by their sum: the router's
    share moves from ffn_norm to attention_norm when it reads attention's input."""
    out = {name: g for name, g in grads.items() if not name.endswith(("attention_norm.weight", "ffn_norm.weight"))}
    for name, g in grads.items():
        if name.endswith("ffn_norm.weight"):
            block = name.removesuffix("ffn_norm.weight")
            out[block + "norms"] = g + grads.get(block + "attention_norm.weight", torch.zeros_like(g))
    return out


def test_without_attention_the_pre_attention_router_is_the_standard_one():
    """When attention adds nothing and the two norms are equal, attention's input is the FFN's:
    the routing, logits and losses are bitwise equal; every gradient is equal within fp32's own
    error, except that the router's share of the norm-weight gradient moves between the norms."""
    tokens_BS = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    base = build(MOE)
    pre = without_attention(with_router_input(base, "pre_attention"))
    standard = without_attention(base)
    assert [b.routes_before_attention for b in pre.layers.values()] == [False, True, True]
    routes, logits, losses, grads = run(standard, tokens_BS)
    routes_pre, logits_pre, losses_pre, grads_pre = run(pre, tokens_BS)
    assert len(routes) == len(routes_pre) == 2
    for route, route_pre in zip(routes, routes_pre, strict=True):
        assert torch.equal(route.indices_Tk, route_pre.indices_Tk)
        assert torch.equal(route.weights_Tk, route_pre.weights_Tk)
    assert torch.equal(logits, logits_pre)
    assert losses == losses_pre and all(aux > 0 and z > 0 for aux, z in losses)
    # The routers' gradients really reach attention_norm now.
    assert grads_pre["layers.1.attention_norm.weight"].abs().max() > 0
    assert "layers.1.attention_norm.weight" not in grads or not grads["layers.1.attention_norm.weight"].any()
    *_, grads64 = run(without_attention(build(MOE, torch.float64)), tokens_BS)
    summed, summed_pre, summed64 = map(norms_summed, (grads, grads_pre, grads64))
    assert summed.keys() == summed_pre.keys()
    for name in summed:
        assert_within_dtype_error(name, summed_pre[name], summed64[name], summed[name])


def test_with_attention_the_routing_differs_and_still_learns():
    tokens_BS = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(2))
    standard = build(MOE)
    pre = with_router_input(standard, "pre_attention")
    routes, logits, _, _ = run(standard, tokens_BS)
    routes_pre, logits_pre, _, grads_pre = run(pre, tokens_BS)
    # The first MoE block's experts read the same FFN input in both; only the choices differ.
    changed = (routes[0].indices_Tk != routes_pre[0].indices_Tk).any(-1).float().mean().item()
    assert 0.2 < changed, changed
    assert not torch.allclose(logits, logits_pre)
    assert grads_pre["layers.1.feed_forward.router.gate.weight"].abs().max() > 0


def test_the_layer_routes_on_the_given_input():
    """MoE(x, r) chooses what the router chooses for r, and computes the experts on x: it equals
    a MoE(x) whose router was made to see r."""
    torch.manual_seed(0)
    layer = MoE(MODEL.dim, MODEL, MOE)
    layer.init_weights(0.3, 0.2)
    x_BSD, r_BSD = torch.randn(2, 9, MODEL.dim), torch.randn(2, 9, MODEL.dim)
    y_BSD = layer(x_BSD, r_BSD)
    twin = copy.deepcopy(layer)
    twin.router.register_forward_pre_hook(lambda m, args: (r_BSD.reshape(-1, MODEL.dim),))
    assert torch.equal(y_BSD, twin(x_BSD))
    assert torch.equal(layer(x_BSD, x_BSD), layer(x_BSD))
    assert not torch.allclose(y_BSD, layer(x_BSD))
    with pytest.raises(ValueError, match=r"router's input has shape \[2, 8, 32\]"):
        layer(x_BSD, r_BSD[:, :8])


def test_config_is_checked_and_off_by_default(tmp_path):
    assert MoEConfig().router_input == "ffn_input"
    assert load_job_config("tiny").moe.router_input == "ffn_input"
    assert load_job_config("tiny", ["moe.router_input=pre_attention"]).moe.router_input == "pre_attention"
    with pytest.raises(ConfigError, match="moe.router_input"):
        load_job_config("tiny", ["moe.router_input=before_attention"])
    with pytest.raises(ConfigError, match="moe.router_input: pre_attention routes MoE layers, but num_experts=0"):
        MoEConfig(router_input="pre_attention").validate(MODEL)
