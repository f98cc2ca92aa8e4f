"""The dispatcher owns the MoE sequencing without moving a bit.

Training through `Dispatcher.run` reproduces, loss for loss, dropped count for dropped count and
parameter for parameter (bitwise), the sequence that MoE.forward ran itself before dispatchers
owned it (kept here as `PreRefactorSequence`): local dispatch in this process, and all-to-all
dispatch over 2 gloo ranks (ep2, FSDP), whose `run` computes the shared experts between the
exchange and the routed experts. Dropless and with capacity drops (both policies), with and
without the shared-expert gate. Also: `apply_ep` refuses moe.dispatcher=local by name.

Inputs are fresh random draws on every run; the seed is in every failure message.
"""

from __future__ import annotations

import random
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from harness import run_distributed
from recipes import recipe_moe
from torch.distributed.tensor import DTensor

from sparsetron.model.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig
from sparsetron.model.moe.balancing import moe_layers
from sparsetron.model.moe.dispatch import LocalDispatcher
from sparsetron.model.moe.experts import GroupedExperts
from sparsetron.model.transformer import Transformer
from sparsetron.parallel.all_to_all_dispatch import AllToAllDispatcher
from sparsetron.parallel.dims import ParallelDims
from sparsetron.parallel.expert_parallel import apply_ep
from sparsetron.parallel.fsdp import apply_fsdp
from sparsetron.parallel.init import SingleProcessInit

SEQ_LEN = 16
BATCH = 2
VOCAB = 64
STEPS = 3
# debug-deepseek's MoE (16 experts, 4 per token, a shared expert, sequence-level aux loss).
CASES = {
    "dropless": {},
    "capacity-probability": dict(capacity_factor=1.0),
    "capacity-position-gated": dict(capacity_factor=0.5, drop_policy="position", shared_expert_gate=True),
}


class PreRefactorSequence:
    """What MoE.forward ran itself before `Dispatcher.run` existed: dispatch, routed experts,
    combine, then the shared experts (gated when configured), which the layer adds; the routed
    experts now take the routing weights `dispatch` returns, as every dispatcher hands them on.
    `steps` is the dispatcher whose dispatch/combine it calls; the experts and callable handed
    to `run` are ignored in favour of the layer's own modules, as the old forward used them."""

    def __init__(self, layer, steps):
        self.layer, self.steps = layer, steps

    def run(self, x_TD, routing, experts, shared_fn):
        layer, steps = self.layer, self.steps
        x_perm_ND, weights_N, tokens_per_expert, ctx = steps.dispatch(x_TD, routing.indices_Tk, routing.weights_Tk)
        y_TD = steps.combine(layer.experts(x_perm_ND, tokens_per_expert, weights_N), ctx)
        shared_TD = None
        if layer.shared_experts is not None:
            shared_TD = layer.shared_experts(x_TD)
            if layer.shared_gate is not None:
                shared_TD = shared_TD * torch.sigmoid(layer.shared_gate(x_TD))
        return y_TD, shared_TD, steps.dropped(ctx)


def build(case, **moe_overrides):
    model_cfg = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=3, ffn_hidden=64, max_seq_len=SEQ_LEN)
    attn_cfg = AttentionConfig(n_heads=2)
    moe_cfg = MoEConfig(**recipe_moe("debug-deepseek", **CASES[case], **moe_overrides))
    for cfg in (attn_cfg, moe_cfg):
        cfg.validate(model_cfg)
    with torch.device("meta"):
        return Transformer(model_cfg, attn_cfg, moe_cfg)


def materialize(model, seed, distributed):
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    with torch.no_grad(), SingleProcessInit() if distributed else nullcontext():
        model.init_weights()
    return model


def batches(seed, rank):
    gen = torch.Generator().manual_seed(seed * 100 + rank)
    return [torch.randint(0, VOCAB, (BATCH, SEQ_LEN + 1), generator=gen) for _ in range(STEPS)]


def local_values(model):
    return {n: (p.to_local() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def train(model, tokens):
    """(losses, dropped assignments per layer per step, parameters after the last step)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, dropped = [], []
    for tokens_BS1 in tokens:
        logits_BSV = model(tokens_BS1[:, :-1])
        loss = F.cross_entropy(logits_BSV.reshape(-1, VOCAB), tokens_BS1[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        dropped.append([int(layer.last_stats.dropped_tokens) for layer in moe_layers(model)])
    return losses, dropped, local_values(model)


def twin_with_pre_refactor_sequence(model_fn):
    """(model, its twin running PreRefactorSequence around the same dispatcher steps)."""
    model, twin = model_fn(), model_fn()
    for layer in moe_layers(twin):
        layer.dispatcher = PreRefactorSequence(layer, layer.dispatcher)
    return model, twin


def compare(results, msg):
    (losses, dropped, params), (ref_losses, ref_dropped, ref_params) = results
    assert losses == ref_losses, f"{msg}: losses {losses} vs pre-refactor {ref_losses}"
    assert dropped == ref_dropped, f"{msg}: dropped {dropped} vs pre-refactor {ref_dropped}"
    different = [name for name, ref in ref_params.items() if not torch.equal(params[name], ref)]
    assert not different, f"{msg}: parameters differ from pre-refactor training: {different}"
    return dropped


@pytest.mark.parametrize("case", list(CASES))
def test_local_dispatch_trains_bitwise_like_the_pre_refactor_sequence(case):
    seed = random.randrange(2**31)
    model, twin = twin_with_pre_refactor_sequence(lambda: materialize(build(case), seed, distributed=False))
    assert all(type(layer.dispatcher) is LocalDispatcher for layer in moe_layers(model))
    tokens = batches(seed, 0)
    dropped = compare([train(model, tokens), train(twin, tokens)], f"{case} seed {seed}")
    assert (sum(map(sum, dropped)) > 0) == (case != "dropless"), f"{case} seed {seed}: dropped {dropped}"


def ep_worker(seed):
    mesh = ParallelDims(dp_shard=2, ep=2, world_size=dist.get_world_size()).build_mesh("cpu")
    local = build("dropless", dispatcher="local")
    try:
        apply_ep(local, mesh)
        refusal = None
    except ConfigError as err:
        refusal = (str(err), [type(layer.experts) is GroupedExperts for layer in moe_layers(local)])
    out = {"refusal": refusal}

    def parallel_model(case):
        model = build(case)
        apply_ep(model, mesh)
        apply_fsdp(model, mesh)
        return materialize(model, seed, distributed=True)

    tokens = batches(seed, dist.get_rank())
    for case in CASES:
        model, twin = twin_with_pre_refactor_sequence(lambda case=case: parallel_model(case))
        kinds = {type(layer.dispatcher).__name__ for layer in moe_layers(model)}
        out[case] = (kinds, train(model, tokens), train(twin, tokens))
    return out


def test_all_to_all_dispatch_trains_bitwise_like_the_pre_refactor_sequence():
    seed = random.randrange(2**31)
    results = run_distributed(ep_worker, 2, seed, timeout=240)
    for rank, out in enumerate(results):
        assert out["refusal"] is not None, f"rank {rank}: apply_ep ran moe.dispatcher=local at parallel.expert=2"
        message, untouched = out["refusal"]
        assert message.startswith("moe.dispatcher:") and "parallel.expert=2" in message, message
        assert all(untouched), f"rank {rank}: apply_ep sharded experts before refusing"
        for case in CASES:
            kinds, result, reference = out[case]
            msg = f"{case} rank {rank} seed {seed}"
            assert kinds == {AllToAllDispatcher.__name__}, msg
            dropped = compare([result, reference], msg)
            assert (sum(map(sum, dropped)) > 0) == (case != "dropless"), f"{msg}: dropped {dropped}"
