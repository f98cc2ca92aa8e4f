"""Multi-token prediction (model/mtp.py) against a direct computation: its targets, its losses and
every gradient they give; the next-token logits and evaluation are untouched; it is counted in FLOPs
and the pipeline split; activation checkpointing changes no bit; what cannot carry it refuses it."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from sparsetron.model.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig
from sparsetron.model.hf.config import export_family
from sparsetron.model.mtp import IGNORE, MTPTargets
from sparsetron.model.params import active_params, num_params
from sparsetron.model.transformer import materialised_transformer
from sparsetron.model.upcycle import UpcycleError, plan_upcycle
from sparsetron.parallel.activation_checkpoint import apply_ac
from sparsetron.parallel.pipeline import layer_costs
from sparsetron.parallel.precision import cross_entropy
from sparsetron.train.config_io import load_job_config
from sparsetron.train.trainer import Trainer

V, S = 61, 23  # odd sizes, so no row or vocabulary length hides an off-by-one


def configs(depth=2, moe=True, **model):
    model_cfg = ModelConfig(vocab_size=V, dim=32, n_layers=2, ffn_hidden=64, max_seq_len=64, mtp_depth=depth, **model)
    moe_cfg = MoEConfig(num_experts=4, top_k=2, n_shared_experts=1) if moe else MoEConfig()
    return model_cfg, AttentionConfig(n_heads=4, n_kv_heads=2), moe_cfg


def batch(generator, B=3):
    """Random tokens and targets, two documents in the second row, some targets ignored."""
    tokens = torch.randint(0, V, (B, S), generator=generator)
    targets = torch.randint(0, V, (B, S), generator=generator)
    doc_ids = torch.zeros(B, S, dtype=torch.int64)
    doc_ids[1, 9:] = 1
    targets[1, 8] = IGNORE  # the packer's: the last token of a document predicts nothing
    targets[2, 4] = IGNORE
    return tokens, targets, doc_ids


def direct_targets(tokens, targets, doc_ids, k):
    """Depth k's inputs and targets, element by element (the module docstring's definition)."""
    B = tokens.shape[0]
    inputs, wanted = torch.zeros_like(tokens), torch.full_like(targets, IGNORE)
    for b in range(B):
        for i in range(S):
            j = i + k
            if j < S:
                inputs[b, i] = tokens[b, j]
                if doc_ids[b, i] == doc_ids[b, j]:
                    wanted[b, i] = targets[b, j]
            elif j == S:
                inputs[b, i] = max(int(targets[b, S - 1]), 0)
    return inputs, wanted


def test_targets_are_the_tokens_further_ahead_in_the_same_document():
    tokens, targets, doc_ids = batch(torch.Generator().manual_seed(1))
    built = MTPTargets.build(tokens, targets, doc_ids, depth=3)
    for k in (1, 2, 3):
        inputs, wanted = direct_targets(tokens, targets, doc_ids, k)
        assert torch.equal(built.input_tokens_KBS[k - 1], inputs), k
        assert torch.equal(built.targets_KBS[k - 1], wanted), k
        assert built.counts_K[k - 1] == (wanted != IGNORE).sum()


def test_losses_and_gradients_equal_a_direct_computation():
    """fp64: the next-token loss's backward gives every parameter the gradient of next-token loss
    + weight / K x sum of the depths' losses, computed here from the modules' pieces."""
    torch.manual_seed(0)
    model = materialised_transformer(*configs(depth=2, mtp_loss_weight=0.7)).double()
    tokens, targets, doc_ids = batch(torch.Generator().manual_seed(2))
    seq = model.sequence_info(tokens, doc_ids)
    seq.mtp = MTPTargets.build(tokens, targets, doc_ids, depth=2)
    F.cross_entropy(model(tokens, seq).flatten(0, 1), targets.flatten()).backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters()}
    got_losses = model.mtp.step_means(torch.device("cpu")).double()
    model.zero_grad()

    plain = model.sequence_info(tokens, doc_ids)
    h = model.tok_embeddings(tokens)
    for block in model.layers.values():
        h = block(h, plain)
    total = F.cross_entropy(model.output(model.norm(h)).flatten(0, 1), targets.flatten())
    losses = []
    for k, layer in enumerate(model.mtp.layers.values(), start=1):
        inputs, wanted = direct_targets(tokens, targets, doc_ids, k)
        joined = torch.cat([layer.hidden_norm(h), layer.embed_norm(model.tok_embeddings(inputs))], dim=-1)
        h = layer.block(layer.proj(joined), plain)
        losses.append(F.cross_entropy(model.output(layer.norm(h)).flatten(0, 1), wanted.flatten()))
    (total + 0.7 / 2 * sum(losses)).backward()

    # The logged losses are kept in fp32.
    torch.testing.assert_close(got_losses, torch.stack(losses).detach(), rtol=2e-7, atol=0)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name
        torch.testing.assert_close(got[name], p.grad, rtol=1e-10, atol=1e-14, msg=lambda m, name=name: f"{name}: {m}")


def test_next_token_logits_and_evaluation_are_unchanged():
    """The main model initialises as without MTP (its depths draw last), and a forward with or
    without the depths' targets returns the same logits."""
    torch.manual_seed(3)
    with_mtp = materialised_transformer(*configs(depth=2))
    torch.manual_seed(3)
    without = materialised_transformer(*configs(depth=0))
    tokens, targets, doc_ids = batch(torch.Generator().manual_seed(4))
    for name, p in without.named_parameters():
        assert torch.equal(p, with_mtp.get_parameter(name)), name
    seq = with_mtp.sequence_info(tokens, doc_ids)
    reference = without(tokens, seq)
    assert torch.equal(with_mtp(tokens, seq), reference)
    seq.mtp = MTPTargets.build(tokens, targets, doc_ids, depth=2)
    assert torch.equal(with_mtp(tokens, seq), reference)


def test_activation_checkpointing_changes_no_gradient():
    torch.manual_seed(5)
    model = materialised_transformer(*configs(depth=2))
    checkpointed = copy.deepcopy(model)
    apply_ac(checkpointed)
    tokens, targets, doc_ids = batch(torch.Generator().manual_seed(6))
    grads = []
    for m in (model, checkpointed):
        seq = m.sequence_info(tokens, doc_ids)
        seq.mtp = MTPTargets.build(tokens, targets, doc_ids, depth=2)
        F.cross_entropy(m(tokens, seq).flatten(0, 1), targets.flatten()).backward()
        grads.append({n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in m.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert torch.equal(grad, grads[1][name]), name


def test_counted_in_flops_and_on_the_last_pipeline_stage():
    model_cfg, attn_cfg, moe_cfg = configs(depth=2, moe=False)
    base = ModelConfig(**{**model_cfg.__dict__, "mtp_depth": 0})
    model = materialised_transformer(model_cfg, attn_cfg, moe_cfg)
    D = model_cfg.dim
    # Dense: every MTP weight is active, and each depth passes through the head once more.
    extra = active_params(model_cfg, attn_cfg, moe_cfg) - active_params(base, attn_cfg, moe_cfg)
    assert extra == num_params(model.mtp) + 2 * D * V
    _, blocks, head = layer_costs(model_cfg, attn_cfg, moe_cfg, S)
    _, base_blocks, base_head = layer_costs(base, attn_cfg, moe_cfg, S)
    head_dim = D // attn_cfg.n_heads
    assert blocks == base_blocks
    assert head - base_head == pytest.approx(6 * extra + 2 * 12 * attn_cfg.n_heads * head_dim * S / 2)


def test_refused_where_it_cannot_be_carried():
    model_cfg, attn_cfg, moe_cfg = configs(depth=1)
    with pytest.raises(ConfigError, match="model.mtp_depth"):
        export_family(model_cfg, attn_cfg, moe_cfg)
    dense = ModelConfig(**{**model_cfg.__dict__, "mtp_depth": 0})
    with pytest.raises(UpcycleError, match="model.mtp_depth"):
        plan_upcycle(dense, attn_cfg, model_cfg, attn_cfg, moe_cfg)
    for key, value in (("mtp_depth", -1), ("mtp_loss_weight", -0.1)):
        with pytest.raises(ConfigError, match=f"model.{key}"):
            ModelConfig(vocab_size=V, **{key: value}).validate()


def test_the_trainer_logs_each_depths_loss_and_evaluates_the_next_token_loss(tmp_path):
    job = load_job_config(
        "debug-dense",
        [
            "model.mtp_depth=2",
            "trainer.steps=2",
            "trainer.eval_interval=2",
            "metrics.log_interval=1",
            "metrics.console=none",
            "checkpoint.save_final=false",
            "schedule.warmup_steps=0",
            f"trainer.run_dir={tmp_path}",
        ],
    )
    trainer = Trainer(job)
    result = trainer.run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert len(logged) == 2
    for record in logged:
        assert all(math.isfinite(record[f"mtp/loss_{k}"]) and record[f"mtp/loss_{k}"] > 0 for k in (1, 2))
    # Evaluation is the next-token loss alone: what the model's logits give on the eval batches.
    batches = trainer.eval_set
    direct = torch.stack(
        [
            cross_entropy(trainer.model(b.tokens, trainer.model.sequence_info(b.tokens, b.doc_ids)), b.targets)
            for b in batches
        ]
    ).mean()
    assert result.eval_losses[2] == pytest.approx(direct.item(), rel=1e-6)
