"""Tensor + sequence parallelism computes what one process computes.

Each rank builds the plain model (seed 0) and its parallelized twin (meta device ->
apply_tp -> to_empty -> init_weights under SingleProcessInit, seed 0), feeds both the same
packed batch with document masking, and compares: logits (whole on every rank), the
cross-entropy loss, every gathered gradient after `sum_grads_over_tp`, and the MoE layers'
expert counts and balancing losses summed over the tensor-parallel ranks. Everything within
1e-5 of the largest reference value (fp32). Also on 4 ranks, tp 2 x FSDP 2, each data rank
reading half of the reference batch. A sequence the ranks cannot split evenly is refused.

Shape legend: B batch, S sequence, V vocabulary.
"""

import pytest
import torch
import torch.nn.functional as F
from harness import run_distributed
from recipes import recipe_moe
from torch.distributed.tensor import DTensor

from sparsetron.model.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig
from sparsetron.model.moe.balancing import moe_layers
from sparsetron.model.transformer import Transformer
from sparsetron.parallel.dims import ParallelDims
from sparsetron.parallel.fsdp import apply_fsdp
from sparsetron.parallel.init import SingleProcessInit
from sparsetron.parallel.tensor_parallel import apply_tp, check_tp, sum_grads_over_tp

V, S, B = 97, 32, 2  # an odd vocabulary: the embedding and head rows split unevenly
TOL = 1e-5

# debug-deepseek with 8 experts of twice the size: sigmoid scores, group-limited routing, a shared
# expert, a dense first layer, the sequence-level aux loss.
DEEPSEEK = recipe_moe("debug-deepseek", granularity=2, aux_loss_coeff=0.01)
SOFTMAX = dict(
    num_experts=8,
    top_k=2,
    n_shared_experts=1,
    shared_expert_gate=True,
    aux_loss_coeff=0.01,
    aux_loss_level="micro_batch",
    z_loss_coeff=0.001,
)
MODELS = {
    "dense-gqa-qknorm-tied": ({}, dict(n_kv_heads=2, qk_norm=True), True),
    "moe-deepseek": (DEEPSEEK, {}, False),
    "moe-softmax-zloss": (SOFTMAX, dict(n_kv_heads=2), False),
    # MoBA on each rank's heads, in layers 0 and 2 (blocks of 4, so documents span several).
    "dense-moba-hybrid": (
        {},
        dict(n_kv_heads=2, backend="moba", moba_block_size=4, moba_topk=2, moba_full_layers=[1]),
        False,
    ),
}


def configs(name):
    moe_kw, attn_kw, tie = MODELS[name]
    model = ModelConfig(vocab_size=V, dim=32, n_layers=3, ffn_hidden=64, tie_embeddings=tie, max_seq_len=S)
    attn = AttentionConfig(n_heads=4, **attn_kw)
    moe = MoEConfig(**moe_kw)
    model.validate()
    attn.validate(model)
    moe.validate(model)
    return model, attn, moe


def reference_model(cfgs):
    with torch.device("meta"):
        model = Transformer(*cfgs)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    return model


def parallel_model(cfgs, mesh):
    with torch.device("meta"):
        model = Transformer(*cfgs)
    apply_tp(model, mesh["tp"])
    if mesh.dims.dp_shard > 1:
        apply_fsdp(model, mesh)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with SingleProcessInit():
        model.init_weights()
    return model


def batch(rows):
    g = torch.Generator().manual_seed(1)
    tokens_BS = torch.randint(0, V, (rows, S), generator=g)
    targets_BS = torch.randint(0, V, (rows, S), generator=g)
    # Documents of uneven lengths that cross the tensor-parallel split of the sequence.
    doc_ids_BS = torch.cumsum(torch.rand(rows, S, generator=g) < 0.15, dim=1)
    return tokens_BS, targets_BS, doc_ids_BS


def loss_of(model, tokens_BS, targets_BS, doc_ids_BS):
    logits_BSV = model(tokens_BS, model.sequence_info(tokens_BS, doc_ids_BS))
    return logits_BSV, F.cross_entropy(logits_BSV.flatten(0, 1), targets_BS.flatten())


def rel_err(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def whole(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def compare_worker(name, dp):
    """On dp x 2 ranks (dp data-parallel replicas of a 2-rank tensor-parallel group, FSDP over dp)."""
    world = torch.distributed.get_world_size()
    mesh = ParallelDims(dp_shard=dp, tp=world // dp, world_size=world).build_mesh("cpu")
    cfgs = configs(name)
    tokens_BS, targets_BS, doc_ids_BS = batch(B * dp)
    ref = reference_model(cfgs)
    ref_logits, ref_loss = loss_of(ref, tokens_BS, targets_BS, doc_ids_BS)
    ref_loss.backward()

    model = parallel_model(cfgs, mesh)
    rows = slice(mesh["dp"].get_local_rank() * B, (mesh["dp"].get_local_rank() + 1) * B)
    logits, loss = loss_of(model, tokens_BS[rows], targets_BS[rows], doc_ids_BS[rows])
    loss.backward()
    sum_grads_over_tp(model, mesh["tp"])

    errors = {"logits": rel_err(logits, ref_logits[rows])}
    # FSDP averages the gradients over dp; the mean of the replicas' losses is the whole batch's.
    mean_loss = loss.detach().clone()
    torch.distributed.all_reduce(mean_loss, group=mesh.group("dp"))
    errors["loss"] = rel_err(mean_loss / dp, ref_loss.detach())
    ref_params = dict(ref.named_parameters())
    for pname, param in model.named_parameters():
        grad = whole(param.grad)  # a collective on DTensors: every rank takes part
        errors[f"grad {pname}"] = rel_err(grad, ref_params[pname].grad)
        if isinstance(param.grad, DTensor):
            # A whole gradient, not a share left for the optimizer to reduce.
            assert not any(p.is_partial() for p in param.grad.placements), (pname, param.grad.placements)
    if dp == 1:
        # Each rank routed its own tokens; over the tensor-parallel group they are the batch's.
        for layer, ref_layer in zip(moe_layers(model), moe_layers(ref), strict=True):
            stats, ref_stats = layer.last_stats, ref_layer.last_stats
            counts = stats.tokens_per_expert.clone()
            torch.distributed.all_reduce(counts, group=mesh.group("tp"))
            assert torch.equal(counts, ref_stats.tokens_per_expert)
            for key in ("aux_loss", "z_loss"):
                value = torch.as_tensor(getattr(stats, key)).clone()
                torch.distributed.all_reduce(value, group=mesh.group("tp"))
                errors[key] = max(errors.get(key, 0.0), rel_err(value, torch.as_tensor(getattr(ref_stats, key))))
    with pytest.raises(ValueError, match=r"sequence length 31 is not divisible by parallel\.tensor=2"):
        model(tokens_BS[:, :31])
    return errors


def assert_small(errors):
    bad = {key: err for key, err in errors.items() if not err <= TOL}
    assert not bad, bad


@pytest.mark.parametrize("name", list(MODELS))
def test_tp2_equals_one_process(name):
    for errors in run_distributed(compare_worker, 2, name, 1, timeout=120):
        assert_small(errors)


def test_tp2_fsdp2_equals_one_process():
    for errors in run_distributed(compare_worker, 4, "moe-deepseek", 2, timeout=180):
        assert_small(errors)


def test_sequence_length_must_split_evenly():
    check_tp(2, 64)
    check_tp(1, 63)
    with pytest.raises(ConfigError, match=r"data\.seq_len=63.*parallel\.tensor=2"):
        check_tp(2, 63)
