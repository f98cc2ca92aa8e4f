"""The precision policy (parallel/precision.py): one process under autocast computes exactly what a
layout whose FSDP gathers bf16 copies of the parameters computes, and the policy's settings.

Shape legend: B batch, S sequence, V vocabulary.
"""

import copy

import pytest
import torch
from torch.distributed.fsdp import MixedPrecisionPolicy

from sparsetron.model.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig
from sparsetron.model.transformer import materialised_transformer
from sparsetron.parallel.precision import Precision, cross_entropy

MODEL = ModelConfig(vocab_size=96, dim=48, n_layers=3, ffn_hidden=96, max_seq_len=64, init_std=0.1)
ATTENTION = AttentionConfig(n_heads=4, n_kv_heads=2, qk_norm=True)
MOE = MoEConfig(
    num_experts=4,
    top_k=2,
    granularity=2,
    n_shared_experts=1,
    shared_expert_gate=True,
    first_k_dense=1,
    score_func="sigmoid",
    n_groups=2,
    topk_groups=1,
    bias_update_rate=1e-3,
)


def with_bf16_parameters(model):
    """What FSDP's mixed precision computes with: every parameter a bf16 copy; buffers (the rotary
    tables, the router's expert bias) as they are."""
    copy_ = copy.deepcopy(model)
    for p in copy_.parameters():
        p.data = p.data.bfloat16()
    return copy_


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_autocast_computes_what_bf16_parameters_compute(moe):
    torch.manual_seed(0)
    model = materialised_transformer(MODEL, ATTENTION, MOE if moe else None)
    with torch.no_grad():
        for module in model.modules():  # norms away from 1.0, so that their rounding shows
            if hasattr(module, "eps"):
                module.weight.normal_(1.0, 0.3)
        if moe:
            model.layers["1"].feed_forward.router.expert_bias.normal_(0, 1e-3)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, MODEL.vocab_size, (2, 37), generator=g)
    doc_ids = torch.tensor([[0] * 20 + [1] * 17, [3] * 37])
    seq = model.sequence_info(tokens, doc_ids)
    gathered = with_bf16_parameters(model)
    policy = Precision.from_config("bf16", torch.device("cpu"))
    with policy.autocast("cpu"):
        ours, theirs = model(tokens, seq), gathered(tokens, seq)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert torch.equal(ours, theirs)
    # fp32 parameters used unrounded (what autocast alone does to a norm or a router) differ.
    with torch.no_grad():
        exact = model(tokens, seq)
    assert not torch.equal(ours.float(), exact)


def test_settings():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert Precision.from_config("auto", cpu).compute_dtype == torch.float32
    assert Precision.from_config("auto", cuda).compute_dtype == torch.bfloat16
    bf16 = Precision.from_config("bf16", cpu)
    assert bf16.mixed and bf16.activation_dtype == torch.bfloat16
    assert bf16.fsdp_policy() == MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    fp32 = Precision.from_config("fp32", cuda)
    assert not fp32.mixed and fp32.fsdp_policy().param_dtype is None
    with fp32.autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ConfigError, match="trainer.precision"):
        Precision.from_config("fp16", cpu)


def test_loss_is_fp32_of_bf16_logits():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 11, generator=g).bfloat16()
    targets = torch.randint(0, 11, (2, 5), generator=g)
    loss = cross_entropy(logits, targets)
    expected = torch.nn.functional.cross_entropy(logits.double().flatten(0, 1), targets.flatten())
    assert loss.dtype == torch.float32 and abs(loss.item() - expected.item()) < 1e-6
