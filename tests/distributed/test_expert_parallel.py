"""Expert parallelism computes what one process computes.

Dispatcher level: on every rank, AllToAllDispatcher + experts + combine give the same output
and input gradients as LocalDispatcher over that rank's tokens, and each rank's experts see
exactly the rows the other ranks routed to them, grouped by expert, in (source rank, token)
order. Model level: ep ranks each hold a slice of one global batch; the mean of their losses
and the gradients of every parameter (gathered to global tensors) equal one process's on
the whole batch (fp32, within 1e-5 relative), the initialisation is bitwise the
single-process one, and parameter names and global shapes match the plain model's. Also
with all routing forced onto ep rank 0's experts, so the other ranks receive no rows.

Inputs are fresh random draws on every run; the seed is in every failure message.
"""

from __future__ import annotations

import random
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from harness import run_distributed
from recipes import recipe_moe
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor

from sparsetron.model.config import AttentionConfig, ModelConfig, MoEConfig
from sparsetron.model.moe.balancing import moe_layers
from sparsetron.model.moe.dispatch import LocalDispatcher
from sparsetron.model.transformer import Transformer
from sparsetron.parallel.activation_checkpoint import apply_ac
from sparsetron.parallel.all_to_all_dispatch import AllToAllDispatcher
from sparsetron.parallel.collectives import sum_over
from sparsetron.parallel.dims import ParallelDims
from sparsetron.parallel.exchange import Exchange
from sparsetron.parallel.expert_parallel import ExpertParallelExperts, apply_ep
from sparsetron.parallel.fsdp import apply_fsdp
from sparsetron.parallel.init import SingleProcessInit

SEQ_LEN = 16
PER_RANK_BATCH = 2
VOCAB = 64

# ---------------------------------------------------------------------------------------------
# Dispatcher against LocalDispatcher.

DISPATCH_EXPERTS = 6
DISPATCH_TOP_K = 2
DISPATCH_DIM = 8
DISPATCH_CASES = {
    "dropless": (0.0, "probability", False),
    "dropless-skewed": (0.0, "probability", True),
    "capacity-probability": (1.0, "probability", True),
    "capacity-position": (1.0, "position", False),
}


def expert_fn(x_ND: torch.Tensor, expert_N: torch.Tensor) -> torch.Tensor:
    """A row-wise function that differs per expert (what a dispatcher must not mix up)."""
    e_N1 = expert_N.to(x_ND.dtype).unsqueeze(-1)
    return torch.tanh(x_ND * (e_N1 + 1)) + e_N1


def routing(rank: int, seed: int, skewed: bool):
    """This rank's tokens (a count that differs by rank), top-k choices and weights."""
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    T = 10 + 3 * rank
    x_TD = torch.randn(T, DISPATCH_DIM, generator=gen)
    scores_TE = torch.rand(T, DISPATCH_EXPERTS, generator=gen)
    if skewed:
        # Every choice lands on ep rank 0's experts (0 and 1), mostly on expert 0.
        scores_TE[:, 0] += 2.0
        scores_TE[:, 1] += 1.0
    indices_Tk = scores_TE.topk(DISPATCH_TOP_K, dim=-1).indices
    weights_Tk = torch.softmax(torch.randn(T, DISPATCH_TOP_K, generator=gen), dim=-1)
    grad_TD = torch.randn(T, DISPATCH_DIM, generator=gen)
    return x_TD, indices_Tk, weights_Tk, grad_TD


def dispatcher_worker(seed):
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = ParallelDims(dp_shard=world, ep=world, world_size=world).build_mesh("cpu")
    L = DISPATCH_EXPERTS // world
    out = {}
    for name, (factor, policy, skewed) in DISPATCH_CASES.items():
        x_TD, indices_Tk, weights_Tk, grad_TD = routing(rank, seed, skewed)
        local = LocalDispatcher(DISPATCH_EXPERTS, factor, policy)
        keep_Tk = local.keep_mask(indices_Tk, weights_Tk)

        ep = AllToAllDispatcher(DISPATCH_EXPERTS, Exchange(mesh["ep"].get_group()), factor, policy)
        x = x_TD.clone().requires_grad_()
        w = weights_Tk.clone().requires_grad_()
        x_ML, w_M, counts_L, ctx = ep.dispatch(x, indices_Tk, w)
        expert_M = rank * L + torch.repeat_interleave(torch.arange(L), counts_L)
        y_TD = ep.combine(w_M.unsqueeze(-1) * expert_fn(x_ML, expert_M), ctx)
        y_TD.backward(grad_TD)

        x_ref = x_TD.clone().requires_grad_()
        w_ref = weights_Tk.clone().requires_grad_()
        x_perm, w_N, counts_E, lctx = local.dispatch(x_ref, indices_Tk, w_ref)
        expert_N = torch.repeat_interleave(torch.arange(DISPATCH_EXPERTS), counts_E)
        y_ref = local.combine(w_N.unsqueeze(-1) * expert_fn(x_perm, expert_N), lctx)
        y_ref.backward(grad_TD)

        # What every rank routed, to build the rows this rank's experts must receive.
        everyone = [None] * world
        dist.all_gather_object(everyone, (x_TD, weights_Tk, indices_Tk, keep_Tk))
        expected, expected_weights = [], []
        for e in range(rank * L, (rank + 1) * L):
            for src_x, src_w, src_idx, src_keep in everyone:
                rows_A = src_x.repeat_interleave(DISPATCH_TOP_K, dim=0)
                mask_A = (src_idx.reshape(-1) == e) & src_keep.reshape(-1)
                expected.append(rows_A[mask_A])
                expected_weights.append(src_w.reshape(-1)[mask_A])
        expected_ML = torch.cat(expected)
        counts_expected = torch.stack(
            [sum(((i == e) & k).sum() for _, _, i, k in everyone) for e in range(rank * L, (rank + 1) * L)]
        )
        out[name] = {
            "received": x_ML.shape[0],
            "rows_match": torch.equal(x_ML.detach(), expected_ML),
            "weights_match": torch.equal(w_M.detach(), torch.cat(expected_weights)),
            "counts_match": torch.equal(counts_L, counts_expected),
            "y_err": (y_TD - y_ref).abs().max().item(),
            "x_grad_err": (x.grad - x_ref.grad).abs().max().item(),
            "w_grad_err": (w.grad - w_ref.grad).abs().max().item(),
            "dropped": int(ep.dropped(ctx)),
            "dropped_expected": int((~keep_Tk).sum()),
        }
    return out


def test_all_to_all_dispatcher_matches_local_dispatcher():
    seed = random.randrange(2**31)
    results = run_distributed(dispatcher_worker, 3, seed, timeout=120)
    for name in DISPATCH_CASES:
        for rank, res in enumerate(results):
            msg = f"{name} rank {rank} seed {seed}: {res[name]}"
            r = res[name]
            assert r["rows_match"] and r["weights_match"] and r["counts_match"], msg
            # The same gathers, expert function and fp32 sum as LocalDispatcher: bitwise equal.
            assert r["y_err"] == 0 and r["x_grad_err"] == 0 and r["w_grad_err"] == 0, msg
            assert r["dropped"] == r["dropped_expected"], msg
        if DISPATCH_CASES[name][2]:
            assert all(res[name]["received"] == 0 for res in results[1:]), name
    assert any(res["capacity-probability"]["dropped"] > 0 for res in results)


# ---------------------------------------------------------------------------------------------
# A whole MoE transformer against one process.

MODELS = {
    # configs/debug-deepseek.yaml: sigmoid scores, group-limited routing, a shared expert, a
    # dense first layer, sequence-level aux loss; 16 experts, 4 per token.
    "deepseek": (dict(n_layers=3, ffn_hidden=64), recipe_moe("debug-deepseek")),
    # Softmax top-2 of 8 experts, a global aux loss (counts summed over the data ranks) and z-loss.
    "softmax-top2": (
        dict(n_layers=2, ffn_hidden=64),
        dict(num_experts=8, top_k=2, aux_loss_coeff=0.01, aux_loss_level="global", z_loss_coeff=0.001),
    ),
}
CASES = {f"{m}{'-skewed' if s else ''}": (m, s) for m in MODELS for s in (False, True)}
CHECKPOINT_CASE = "deepseek"


def build(model_name):
    model_kwargs, moe_kwargs = MODELS[model_name]
    model_cfg = ModelConfig(vocab_size=VOCAB, dim=32, max_seq_len=SEQ_LEN, **model_kwargs)
    attn_cfg = AttentionConfig(n_heads=2)
    moe_cfg = MoEConfig(**moe_kwargs)
    for cfg in (attn_cfg, moe_cfg):
        cfg.validate(model_cfg)
    with torch.device("meta"):
        return Transformer(model_cfg, attn_cfg, moe_cfg)


def materialize(model, seed, skewed, distributed):
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    with torch.no_grad(), SingleProcessInit() if distributed else nullcontext():
        model.init_weights()
    if skewed:
        for layer in moe_layers(model):
            # Every choice goes to experts 0..k-1, which ep rank 0 holds at every ep degree tested.
            bias = torch.zeros(layer.num_experts)
            bias[: layer.top_k] = torch.linspace(20.0, 10.0, layer.top_k)
            layer.router.expert_bias.copy_(bias)


def global_batch(seed, sequences):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (sequences, SEQ_LEN + 1), generator=gen)


def loss_of(model, tokens_BS1):
    logits_BSV = model(tokens_BS1[:, :-1])
    return F.cross_entropy(logits_BSV.reshape(-1, VOCAB), tokens_BS1[:, 1:].reshape(-1))


def parameters(model):
    """Parameters by their state-dict name (activation checkpointing's wrapper prefix removed)."""
    return {name.replace("_checkpoint_wrapped_module.", ""): p for name, p in model.named_parameters()}


def full(t):
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def ep_worker(dp_replicate, dp_shard, ep, use_ac, seed, checkpoints):
    world = dist.get_world_size()
    dims = ParallelDims(dp_replicate=dp_replicate, dp_shard=dp_shard, ep=ep, world_size=world)
    mesh = dims.build_mesh("cpu")
    data_rank = mesh["dp_cp"].get_local_rank()
    out = {}
    for case, (model_name, skewed) in CASES.items():
        model = build(model_name)
        plain_state = {key: value.shape for key, value in model.state_dict().items()}
        if use_ac:
            apply_ac(model)
        apply_ep(model, mesh)
        apply_fsdp(model, mesh)
        for layer in moe_layers(model):
            layer.count_reducer = sum_over(mesh.group("dp_cp"))
        materialize(model, seed, skewed, distributed=True)
        received = []
        for layer in moe_layers(model):
            assert isinstance(layer.experts, ExpertParallelExperts)
            layer.experts.register_forward_pre_hook(lambda _, args, rows=received: rows.append(args[0].shape[0]))
        init = {name: full(p) for name, p in parameters(model).items()}
        if case == CHECKPOINT_CASE:
            dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=f"{checkpoints}/parallel")

        tokens = global_batch(seed, PER_RANK_BATCH * dims.dp_cp)
        loss = loss_of(model, tokens[data_rank * PER_RANK_BATCH : (data_rank + 1) * PER_RANK_BATCH])
        loss.backward()
        grads = {name: full(p.grad) for name, p in parameters(model).items()}
        losses = [None] * world
        dist.all_gather_object(losses, loss.item())
        out[case] = {
            "losses": losses,
            "received": received,
            # Global shapes under the plain model's keys: what a checkpoint holds at any layout.
            "state_dict_unchanged": {key: value.shape for key, value in model.state_dict().items()} == plain_state,
        }
        if case == CHECKPOINT_CASE:
            state = {"model": get_model_state_dict(model)}
            dcp.load(state, checkpoint_id=f"{checkpoints}/single")
            set_model_state_dict(model, state["model"])
            out[case]["loaded"] = {name: full(p) for name, p in parameters(model).items()}
        if dist.get_rank() == 0:
            out[case].update(init=init, grads=grads)
    return out


def single_process(case, seed, sequences):
    model_name, skewed = CASES[case]
    model = build(model_name)
    materialize(model, seed, skewed, distributed=False)
    init = {name: full(p) for name, p in model.named_parameters()}
    loss = loss_of(model, global_batch(seed, sequences))
    loss.backward()
    grads = {name: full(p.grad) for name, p in model.named_parameters()}
    return loss.item(), init, grads


LAYOUTS = {
    # name: (processes, dp_replicate, dp_shard, ep, activation checkpointing)
    "ep2": (2, 1, 2, 2, False),
    "ep4": (4, 1, 4, 4, False),
    "ep2-edp2": (4, 1, 4, 2, True),
    "hsdp2-ep2": (4, 2, 2, 2, False),
}


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # the one-process DCP calls
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_expert_parallel_model_equals_one_process(tmp_path, layout):
    world, dp_replicate, dp_shard, ep, use_ac = LAYOUTS[layout]
    seed = random.randrange(2**31)
    # A one-process checkpoint for the parallel ranks to load (other weights than their init).
    single = build(CASES[CHECKPOINT_CASE][0])
    materialize(single, seed + 1, False, distributed=False)
    dcp.save({"model": single.state_dict()}, checkpoint_id=tmp_path / "single", no_dist=True)

    results = run_distributed(ep_worker, world, dp_replicate, dp_shard, ep, use_ac, seed, str(tmp_path), timeout=240)

    # Each rank loaded the one-process weights: the global tensors are the same.
    for name, value in single.named_parameters():
        assert torch.equal(results[0][CHECKPOINT_CASE]["loaded"][name], value), f"{layout} seed {seed}: load {name}"
    # The parallel ranks' checkpoint of their init loads into one process.
    reloaded = build(CASES[CHECKPOINT_CASE][0])
    materialize(reloaded, seed + 2, False, distributed=False)
    state = {"model": reloaded.state_dict()}
    dcp.load(state, checkpoint_id=tmp_path / "parallel", no_dist=True)
    for name, value in reloaded.named_parameters():
        assert torch.equal(value, results[0][CHECKPOINT_CASE]["init"][name]), f"{layout} seed {seed}: save {name}"
    for case, (_, skewed) in CASES.items():
        msg = f"{layout} {case} seed {seed}"
        rank0 = results[0][case]
        ref_loss, ref_init, ref_grads = single_process(case, seed, PER_RANK_BATCH * world)
        assert rank0["state_dict_unchanged"], msg
        assert rank0["init"].keys() == ref_init.keys(), msg
        for name, ref in ref_init.items():
            assert torch.equal(rank0["init"][name], ref), f"{msg}: init of {name}"
        assert sum(rank0["losses"]) / world == pytest.approx(ref_loss, rel=1e-5), msg
        for name, ref in ref_grads.items():
            err = (rank0["grads"][name] - ref).abs().max().item()
            assert err <= 1e-5 * ref.abs().max().item(), f"{msg}: grad of {name} off by {err}"
        received = [res[case]["received"] for res in results]
        if skewed:
            # ep rank 0 of each ep group (consecutive ranks) took every row; the others none.
            assert all(sum(rows) == 0 for rank, rows in enumerate(received) if rank % ep != 0), msg
        else:
            assert all(sum(rows) > 0 for rows in received), msg
