"""Balancing: auxiliary loss at each level, z-loss, expert-bias updates, load accounting, metrics.

Shape legend: T tokens, B sequences, S tokens per sequence, E experts, k experts per token.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sparsetron.model.config import ModelConfig, MoEConfig
from sparsetron.model.moe import MoE
from sparsetron.model.moe.balancing import (
    TokenSplit,
    expert_counts,
    load_balancing_loss,
    moe_layers,
    moe_load_histograms,
    moe_metrics,
    router_z_loss,
    set_aux_loss_scale,
    update_expert_bias,
)


def random_routing(T, E, k, seed, score_func="softmax"):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g, dtype=torch.float64)
    scores = torch.softmax(logits, -1) if score_func == "softmax" else torch.sigmoid(logits)
    indices = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    return logits, scores, indices


def naive_aux(scores, indices, coeff, normalise_sigmoid=False):
    T, E = scores.shape
    k = indices.shape[1]
    counts = [0] * E
    for row in indices.tolist():
        for e in row:
            counts[e] += 1
    total = 0.0
    for i in range(E):
        P_i = sum((scores[t, i] / scores[t].sum() if normalise_sigmoid else scores[t, i]) for t in range(T)) / T
        total += counts[i] / (T * k) * P_i
    return float(coeff * E * total)


def test_expert_counts():
    idx = torch.tensor([[0, 2, 2, 5], [1, 1, 1, 1]])
    assert expert_counts(idx, 6).tolist() == [[1, 0, 2, 0, 0, 1], [0, 4, 0, 0, 0, 0]]


def test_uniform_routing_gives_exactly_the_coefficient():
    T, E = 6, 3
    scores = torch.full((T, E), 1 / 3, dtype=torch.float64)
    indices = torch.tensor([[0], [1], [2], [0], [1], [2]])
    assert load_balancing_loss(scores, indices, 0.01).item() == pytest.approx(0.01, rel=1e-12)


def test_collapsed_routing_gives_E_times_coefficient():
    # Every token to expert 0 with probability 1: f_0 = P_0 = 1 -> loss = coeff * E.
    scores = torch.zeros(5, 4, dtype=torch.float64)
    scores[:, 0] = 1
    loss = load_balancing_loss(scores, torch.zeros(5, 1, dtype=torch.long), 0.5)
    assert loss.item() == pytest.approx(0.5 * 4)


@pytest.mark.parametrize("k", [1, 3])
def test_micro_batch_aux_matches_naive(k):
    _, scores, indices = random_routing(24, 6, k, seed=k)
    loss = load_balancing_loss(scores, indices, 0.03, level="micro_batch")
    assert loss.item() == pytest.approx(naive_aux(scores, indices, 0.03), rel=1e-12)


def test_sigmoid_aux_normalises_scores_per_token():
    _, scores, indices = random_routing(20, 8, 2, seed=5, score_func="sigmoid")
    loss = load_balancing_loss(scores, indices, 0.1, score_func="sigmoid")
    assert loss.item() == pytest.approx(naive_aux(scores, indices, 0.1, normalise_sigmoid=True), rel=1e-12)
    assert abs(loss.item() - naive_aux(scores, indices, 0.1)) > 1e-3


def test_sequence_aux_matches_naive_per_sequence_mean():
    B, S, E, k = 3, 8, 5, 2
    _, scores, indices = random_routing(B * S, E, k, seed=7)
    # Make sequences disagree so the per-sequence value differs from the batch value.
    indices[:S] = torch.tensor([0, 1])
    scores[:S] = torch.tensor([0.45, 0.45, 0.04, 0.03, 0.03], dtype=torch.float64)
    loss = load_balancing_loss(scores, indices, 0.2, level="sequence", seq_len=S)
    expected = sum(naive_aux(scores[b * S : (b + 1) * S], indices[b * S : (b + 1) * S], 0.2) for b in range(B)) / B
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert abs(loss.item() - naive_aux(scores, indices, 0.2)) > 1e-3
    with pytest.raises(ValueError, match="seq_len"):
        load_balancing_loss(scores, indices, 0.2, level="sequence", seq_len=7)


def test_global_aux_uses_group_counts_and_local_probabilities():
    T, E, k = 16, 6, 2
    _, scores, indices = random_routing(2 * T, E, k, seed=9)
    mine, other = slice(0, T), slice(T, 2 * T)
    other_vec = torch.cat([expert_counts(indices[other].reshape(1, -1), E)[0], torch.tensor([T * k])])
    seen = []

    def reducer(local):
        seen.append(local.clone())
        return local + other_vec  # what an all-reduce SUM over two ranks returns

    loss = load_balancing_loss(scores[mine], indices[mine], 0.1, level="global", count_reducer=reducer)
    f_all = expert_counts(indices.reshape(1, -1), E)[0].double() / (2 * T * k)
    expected = 0.1 * E * (f_all * scores[mine].mean(0)).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert len(seen) == 1 and seen[0][-1].item() == T * k
    local_only = load_balancing_loss(scores[mine], indices[mine], 0.1, level="global")
    assert local_only.item() == pytest.approx(naive_aux(scores[mine], indices[mine], 0.1), rel=1e-12)
    assert abs(local_only.item() - loss.item()) > 1e-4


@pytest.mark.parametrize("level", ["micro_batch", "sequence", "z"])
def test_token_split_shares_sum_to_the_whole_loss_and_gradient(level):
    # Two "ranks" each hold one half of every sequence (sequence parallelism).
    B, S, E, k = 3, 8, 6, 2
    logits, _, indices = random_routing(B * S, E, k, seed=17)
    halves = [
        torch.arange(S).view(1, S).add(S * torch.arange(B).view(B, 1))[:, h * S // 2 : (h + 1) * S // 2] for h in (0, 1)
    ]

    def loss_of(logits_TE, indices_Tk, seq_len, split=None):
        if level == "z":
            return router_z_loss(logits_TE, 0.01, split)
        scores = torch.softmax(logits_TE, -1)
        return load_balancing_loss(scores, indices_Tk, 0.1, level=level, seq_len=seq_len, token_split=split)

    whole_logits = logits.clone().requires_grad_()
    whole = loss_of(whole_logits, indices, S)
    whole.backward()

    # First pass records what each half would send to the all-reduce; the second adds the other half's.
    sent = []
    record = TokenSplit(reduce=lambda local: sent.append(local.clone()) or local, ranks=2)
    for rows in halves:
        loss_of(logits[rows.flatten()], indices[rows.flatten()], S // 2, record)
    shares, grad = [], torch.zeros_like(logits)
    for h, rows in enumerate(halves):
        other = sent[1 - h] if sent else None
        split = TokenSplit(reduce=lambda local, other=other: local + other, ranks=2)
        part_logits = logits[rows.flatten()].clone().requires_grad_()
        share = loss_of(part_logits, indices[rows.flatten()], S // 2, split)
        share.backward()
        shares.append(share.item())
        grad[rows.flatten()] += part_logits.grad
    assert sum(shares) == pytest.approx(whole.item(), rel=1e-12)
    assert shares[0] != pytest.approx(shares[1], rel=1e-3)
    torch.testing.assert_close(grad, whole_logits.grad, rtol=1e-12, atol=1e-15)


def test_aux_gradient_flows_through_probabilities_only():
    # d loss / d P_i = coeff * E * f_i, and P_i is a mean over T tokens.
    _, scores, indices = random_routing(12, 4, 2, seed=11)
    scores.requires_grad_()
    load_balancing_loss(scores, indices, 0.5).backward()
    f = expert_counts(indices.reshape(1, -1), 4)[0].double() / 24
    torch.testing.assert_close(scores.grad, (0.5 * 4 * f / 12).expand(12, 4))


def test_z_loss_matches_naive():
    logits, _, _ = random_routing(10, 7, 1, seed=13)
    logits = logits * 4
    naive = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 10
    assert router_z_loss(logits, 1e-3).item() == pytest.approx(1e-3 * naive, rel=1e-12)


# ------------------------------------------------------------------------------------------
# Model-level helpers.


def build(n_layers=2, seed=0, **moe):
    torch.manual_seed(seed)
    cfg = MoEConfig(**{"num_experts": 8, "top_k": 2, **moe})
    model_cfg = ModelConfig(dim=16, ffn_hidden=24)
    layers = nn.ModuleList(MoE(16, model_cfg, cfg) for _ in range(n_layers))
    for layer in layers:
        layer.init_weights(0.5, 0.1)
    return layers


def run_all(layers, x):
    for layer in layers:
        x = x + layer(x)
    return x


def test_moe_layers_and_aux_scale():
    layers = build(n_layers=3)
    assert moe_layers(layers) == list(layers)
    set_aux_loss_scale(layers, 0.25)
    assert all(layer.aux_loss_scale == 0.25 for layer in layers)


def test_bias_update_direction_and_reset():
    rate = 1e-2
    layers = build(n_layers=2, bias_update_rate=rate)
    with torch.no_grad():
        layers[0].tokens_per_expert_acc.copy_(torch.tensor([10, 2, 6, 6, 6, 6, 6, 6]))  # mean 6
        layers[1].tokens_per_expert_acc.copy_(torch.tensor([0, 0, 0, 0, 0, 0, 0, 8]))  # mean 1
    update_expert_bias(layers)
    torch.testing.assert_close(layers[0].router.expert_bias, torch.tensor([-rate, rate, 0, 0, 0, 0, 0, 0]))
    torch.testing.assert_close(layers[1].router.expert_bias, torch.tensor([rate] * 7 + [-rate]))
    assert all(layer.tokens_per_expert_acc.sum() == 0 for layer in layers)
    assert layers[0].step_stats.tokens_per_expert.tolist() == [10, 2, 6, 6, 6, 6, 6, 6]
    # A second step with nothing counted moves nothing.
    update_expert_bias(layers)
    torch.testing.assert_close(layers[0].router.expert_bias, torch.tensor([-rate, rate, 0, 0, 0, 0, 0, 0]))


def test_bias_update_uses_all_reduced_counts_in_one_call():
    rate = 1e-3
    layers = build(n_layers=2, bias_update_rate=rate)
    with torch.no_grad():
        layers[0].tokens_per_expert_acc.copy_(torch.tensor([10, 2, 6, 6, 6, 6, 6, 6]))
        layers[1].tokens_per_expert_acc.copy_(torch.tensor([1, 1, 1, 1, 1, 1, 1, 1]))
    layers[0].dropped_tokens_acc = torch.tensor(4)
    # Per layer: tokens per expert, then dropped tokens.
    other_rank = torch.tensor([0, 20, 0, 0, 0, 0, 0, 0, 3] + [0, 0, 0, 0, 0, 0, 0, 8, 7])
    calls = []

    def all_reduce(t):
        calls.append(t.clone())
        return t + other_rank

    update_expert_bias(layers, all_reduce=all_reduce)
    assert len(calls) == 1 and calls[0].shape == (18,)
    assert calls[0][8].item() == 4 and calls[0][17].item() == 0
    assert layers[0].step_stats.dropped_tokens.item() == 4 + 3
    assert layers[1].step_stats.dropped_tokens.item() == 7
    assert layers[1].step_stats.tokens_per_expert.tolist() == [1] * 7 + [9]
    # Layer 0 sums to [10, 22, 6, ...], mean 8.5: expert 1 is now the overloaded one.
    torch.testing.assert_close(layers[0].router.expert_bias, rate * torch.tensor([-1.0, -1, 1, 1, 1, 1, 1, 1]))
    torch.testing.assert_close(layers[1].router.expert_bias, rate * torch.tensor([1.0] * 7 + [-1]))


def test_skipped_step_resets_counts_without_moving_bias():
    layers = build(n_layers=1, bias_update_rate=0.1)
    with torch.no_grad():
        layers[0].tokens_per_expert_acc.copy_(torch.tensor([9, 1, 1, 1, 1, 1, 1, 1]))
    update_expert_bias(layers, apply=False)
    assert layers[0].router.expert_bias.abs().sum() == 0
    assert layers[0].tokens_per_expert_acc.sum() == 0
    assert layers[0].step_stats.tokens_per_expert.tolist() == [9, 1, 1, 1, 1, 1, 1, 1]


def test_no_bias_update_without_rate_but_counts_reset():
    layers = build(n_layers=1)
    layers[0](torch.randn(2, 5, 16))
    update_expert_bias(layers)
    assert layers[0].router.expert_bias.abs().sum() == 0
    assert layers[0].tokens_per_expert_acc.sum() == 0
    assert layers[0].step_stats.tokens_per_expert.sum() == 10 * 2


def test_real_step_lowers_bias_of_overloaded_experts():
    layers = build(n_layers=1, bias_update_rate=0.05, seed=3)
    layer = layers[0]
    x = torch.randn(4, 16, 16)
    layer(x)
    load = layer.last_stats.tokens_per_expert.clone()
    update_expert_bias(layers)
    bias = layer.router.expert_bias
    assert (bias[load > load.float().mean()] < 0).all() and (bias[load < load.float().mean()] > 0).all()
    # The bias then shifts selection towards the underloaded experts.
    layer(x)
    new_load = layer.last_stats.tokens_per_expert
    assert new_load.max() <= load.max()
    assert new_load.sum() == load.sum()


def test_each_training_forward_counts_once_and_recompute_or_eval_not_at_all():
    layers = build(n_layers=2, seed=4)
    x1, x2 = torch.randn(2, 6, 16, requires_grad=True), torch.randn(2, 6, 16)

    run_all(layers, x1)
    once = [layer.last_stats.tokens_per_expert.clone() for layer in layers]
    layers[0].accumulate_stats()  # a stray second call adds nothing
    for layer, counts in zip(layers, once, strict=True):
        assert torch.equal(layer.tokens_per_expert_acc, counts)
        assert layer.micro_batches_acc == 1

    # Activation checkpointing re-runs forward inside backward: counted once, by the first run.
    for layer in layers:
        layer._reset_step_sums()
    y = checkpoint(run_all, layers, x1, use_reentrant=False)
    y.sum().backward()
    for layer, counts in zip(layers, once, strict=True):
        assert torch.equal(layer.tokens_per_expert_acc, counts)
        assert layer.micro_batches_acc == 1

    # Several forwards before their backwards (a pipeline schedule) each count.
    run_all(layers, x2)
    second = [layer.last_stats.tokens_per_expert.clone() for layer in layers]
    for layer, a, b in zip(layers, once, second, strict=True):
        assert torch.equal(layer.tokens_per_expert_acc, a + b)
        assert layer.tokens_per_expert_acc.sum() == 2 * 2 * 2 * 6

    # Neither a forward without gradients nor one in eval mode is training.
    with torch.no_grad():
        run_all(layers, x2)
    layers.eval()
    run_all(layers, x2)
    layers.train()
    assert all(layer.micro_batches_acc == 2 for layer in layers)


class _Block(nn.Module):
    def __init__(self, layer_id, moe):
        super().__init__()
        self.layer_id = layer_id
        self.feed_forward = moe


def test_metrics_per_layer():
    layers = build(n_layers=2, aux_loss_coeff=0.01, z_loss_coeff=1e-3, bias_update_rate=0.1, capacity_factor=1.0)
    model = nn.ModuleDict({"3": _Block(3, layers[0]), "5": _Block(5, layers[1])})
    x = torch.randn(2, 8, 16)
    for layer in layers:
        layer(x)
    metrics = moe_metrics(model)  # before the step: the last micro-batch's loads
    stats = layers[0].last_stats
    load = stats.tokens_per_expert.float()
    assert metrics["moe/layer3/max_load"] == load.max().item()
    assert metrics["moe/layer3/mean_load"] == pytest.approx(load.mean().item())
    assert metrics["moe/layer3/load_imbalance"] == pytest.approx((load.max() / load.mean()).item())
    assert metrics["moe/layer3/aux_loss"] == pytest.approx(stats.aux_loss.item())
    assert metrics["moe/layer3/z_loss"] == pytest.approx(stats.z_loss.item())
    assert metrics["moe/layer3/dropped_tokens"] == stats.dropped_tokens.item()
    assert metrics["moe/layer3/bias_norm"] == 0.0
    assert {k.split("/")[1] for k in metrics} == {"layer3", "layer5"}

    layers[0](torch.randn(2, 8, 16))  # a second micro-batch, then the step
    update_expert_bias(model)
    metrics = moe_metrics(model)
    step = (load + layers[0].last_stats.tokens_per_expert.float()).tolist()
    assert metrics["moe/layer3/max_load"] == max(step)
    assert metrics["moe/layer3/min_load"] == min(step)
    assert metrics["moe/layer3/bias_norm"] == pytest.approx(layers[0].router.expert_bias.norm().item())
    assert metrics["moe/layer3/bias_norm"] > 0
    hist = moe_load_histograms(model)
    assert hist["moe/layer3/tokens_per_expert"].tolist() == [int(v) for v in step]


def test_metrics_without_layer_ids_count_moe_layers():
    layers = build(n_layers=2)
    for layer in layers:
        layer(torch.randn(1, 4, 16))
    metrics = moe_metrics(layers)
    assert metrics["moe/layer0/aux_loss"] == 0.0 and "moe/layer1/max_load" in metrics


def _moe_blocks(layers, ids):
    return nn.ModuleDict({str(i): _Block(i, layer) for i, layer in zip(ids, layers, strict=True)})


def _train_micro_batches(layers, model, n, checkpointed=()):
    """n micro-batches of forward and backward (those in `checkpointed` under activation
    checkpointing); returns each micro-batch's last_stats per layer."""
    seen = []
    for i in range(n):
        x = torch.randn(2, 8, 16) * (1 + i)  # sharper routing each time, so the stats differ
        x.requires_grad_()
        y = checkpoint(run_all, layers, x, use_reentrant=False) if i in checkpointed else run_all(layers, x)
        y.pow(2).mean().backward()
        seen.append([layer.last_stats for layer in layers])
    return seen


def test_step_metrics_cover_every_micro_batch_and_ignore_a_later_eval_forward():
    layers = build(n_layers=2, seed=6, aux_loss_coeff=0.01, z_loss_coeff=1e-3, capacity_factor=0.5)
    model = _moe_blocks(layers, [1, 4])
    set_aux_loss_scale(model, 1 / 3)
    seen = _train_micro_batches(layers, model, 3, checkpointed={1})
    update_expert_bias(model)
    metrics = moe_metrics(model)

    for j, layer_id in enumerate([1, 4]):
        prefix = f"moe/layer{layer_id}/"
        mbs = [mb[j] for mb in seen]
        load = torch.stack([s.tokens_per_expert for s in mbs]).sum(0).float()
        aux = sum(s.aux_loss.item() for s in mbs) / 3
        z = sum(s.z_loss.item() for s in mbs) / 3
        dropped = sum(s.dropped_tokens.item() for s in mbs)
        assert load.sum().item() == 3 * 2 * 8 * 2
        assert metrics[prefix + "max_load"] == load.max().item()
        assert metrics[prefix + "min_load"] == load.min().item()
        assert metrics[prefix + "mean_load"] == pytest.approx(load.mean().item())
        assert metrics[prefix + "load_imbalance"] == pytest.approx((load.max() / load.mean()).item())
        assert metrics[prefix + "aux_loss"] == pytest.approx(aux, rel=1e-6)
        assert metrics[prefix + "z_loss"] == pytest.approx(z, rel=1e-6)
        assert metrics[prefix + "dropped_tokens"] == dropped
        # Not the last micro-batch's numbers (what was reported before).
        assert metrics[prefix + "aux_loss"] != pytest.approx(mbs[-1].aux_loss.item(), rel=1e-4)
        assert metrics[prefix + "z_loss"] != pytest.approx(mbs[-1].z_loss.item(), rel=1e-4)
        assert all(s.dropped_tokens > 0 for s in mbs) and dropped > mbs[-1].dropped_tokens.item()
        assert layers[j].step_stats.micro_batches == 3

    hist = moe_load_histograms(model)
    # An evaluation forward after the step replaces last_stats but not the step's numbers.
    with torch.no_grad():
        run_all(layers, torch.randn(3, 5, 16) * 5)
    assert layers[0].last_stats.tokens_per_expert.sum() == 3 * 5 * 2
    assert moe_metrics(model) == metrics
    after = moe_load_histograms(model)
    assert after.keys() == hist.keys() and all(torch.equal(after[k], hist[k]) for k in hist)


def test_step_accumulators_stay_out_of_the_state_dict_and_reset_each_step():
    layers = build(n_layers=1, seed=8, aux_loss_coeff=0.01, z_loss_coeff=1e-3, capacity_factor=0.5)
    before = {k: v.clone() for k, v in layers.state_dict().items()}
    _train_micro_batches(layers, layers, 2)
    layer = layers[0]
    assert layer.micro_batches_acc == 2 and layer.aux_loss_acc > 0 and layer.z_loss_acc > 0
    assert layer.dropped_tokens_acc > 0
    after = layers.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    fresh = build(n_layers=1, seed=9, aux_loss_coeff=0.01, z_loss_coeff=1e-3, capacity_factor=0.5)
    fresh.load_state_dict(after, strict=True)

    update_expert_bias(layers)
    assert layer.micro_batches_acc == 0 and layer.aux_loss_acc == 0.0 and layer.z_loss_acc == 0.0
    assert layer.dropped_tokens_acc == 0 and layer.tokens_per_expert_acc.sum() == 0
    assert layer.step_stats.micro_batches == 2 and layer.step_stats.aux_loss > 0
    # A step in which nothing was accumulated reports zeros, not the previous step's numbers.
    update_expert_bias(layers)
    metrics = moe_metrics(layers)
    assert metrics["moe/layer0/max_load"] == 0.0 and metrics["moe/layer0/aux_loss"] == 0.0
    assert metrics["moe/layer0/dropped_tokens"] == 0.0


def test_moe_load_histograms_give_each_layers_step_load():
    ids = [0, 2, 5]
    layers = build(n_layers=3, seed=10)
    model = _moe_blocks(layers, ids)
    assert moe_load_histograms(model) == {}
    seen = _train_micro_batches(layers, model, 2)
    update_expert_bias(model)
    hist = moe_load_histograms(model)
    assert set(hist) == {f"moe/layer{i}/tokens_per_expert" for i in ids}
    for j, layer_id in enumerate(ids):
        h = hist[f"moe/layer{layer_id}/tokens_per_expert"]
        expected = seen[0][j].tokens_per_expert + seen[1][j].tokens_per_expert
        assert h.dtype == torch.int64 and h.shape == (8,) and h.device.type == "cpu"
        assert torch.equal(h, expected) and h.sum() == 2 * 2 * 8 * 2
        assert not torch.equal(h, seen[1][j].tokens_per_expert)
    # The caller owns what it gets: changing it leaves the recorded step alone.
    hist["moe/layer0/tokens_per_expert"].zero_()
    assert layers[0].step_stats.tokens_per_expert.sum() == 2 * 2 * 8 * 2
