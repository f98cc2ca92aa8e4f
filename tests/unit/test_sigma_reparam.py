"""model.sigma_reparam (model/sigma_reparam.py): sigma from power iteration is the spectral norm,
the model at initialisation computes what it computes without the reparametrization, u and v
move once per training step and survive a resume, activation checkpointing recomputes the same
sigma, gammas are not decayed, and what cannot represent it refuses it by name."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from sparsetron.model.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig
from sparsetron.model.hf.config import export_family
from sparsetron.model.sigma_reparam import (
    INIT_ITERATIONS,
    ReparamLinear,
    init_sigma_reparam,
    power_iteration,
    reparametrized,
    spectral_norm_estimate,
)
from sparsetron.model.transformer import materialised_transformer
from sparsetron.model.upcycle import UpcycleError, plan_upcycle
from sparsetron.parallel import sigma_reparam as parallel_sigma
from sparsetron.parallel.activation_checkpoint import apply_ac
from sparsetron.train.config_io import load_job_config
from sparsetron.train.optim import param_groups
from sparsetron.train.trainer import Trainer

EPS32 = torch.finfo(torch.float32).eps
V = 97
MOE = dict(num_experts=4, top_k=2, first_k_dense=1, n_shared_experts=1, shared_expert_gate=True, dispatch_dim=16)


def configs(reparam: bool, moe: bool):
    model = ModelConfig(vocab_size=V, dim=32, n_layers=3, ffn_hidden=48, max_seq_len=64, sigma_reparam=reparam)
    attn = AttentionConfig(n_heads=4, n_kv_heads=2, qkv_bias=True)
    moe_cfg = MoEConfig(**MOE) if moe else MoEConfig()
    model.validate()
    attn.validate(model)
    moe_cfg.validate(model)
    return model, attn, moe_cfg


@functools.cache
def _built(reparam: bool, moe: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    return materialised_transformer(*configs(reparam, moe))


def build(reparam: bool, moe: bool) -> torch.nn.Module:
    """A fresh copy of the model built from seed 0 (built once per kind: the CPU is shared)."""
    return copy.deepcopy(_built(reparam, moe))


def tokens(seed: int = 1):
    return torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(seed))


def fp32_tolerance(W: torch.Tensor) -> float:
    """Relative error of u^T W v in fp32: a dot product of length max(m, n) accumulates ~n eps
    in the worst case, twice (W v, then u^T)."""
    return 2 * max(W.shape[-2:]) * EPS32


@pytest.mark.parametrize("shape", [(16, 16), (40, 9), (9, 40), (3, 2, 24, 11)], ids=str)
def test_power_iteration_converges_to_the_spectral_norm(shape):
    torch.manual_seed(sum(shape))
    W = torch.randn(shape)
    u, v = torch.randn(shape[:-1]), torch.randn((*shape[:-2], shape[-1]))
    # Slow convergence needs sigma_2 / sigma_1 near 1; these draws reach 1e-12 well before 2000.
    u, v = power_iteration(W, u, v, 2000)
    sigma = spectral_norm_estimate(W, u, v)
    exact = torch.linalg.matrix_norm(W.double(), ord=2)
    torch.testing.assert_close(sigma.double(), exact, rtol=fp32_tolerance(W), atol=0)
    # And one step from a random start is an underestimate (u^T W v <= sigma for unit u, v).
    u1, v1 = power_iteration(W, torch.randn(shape[:-1]), torch.randn((*shape[:-2], shape[-1])), 1)
    assert (spectral_norm_estimate(W, u1, v1).double() <= exact * (1 + fp32_tolerance(W))).all()


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_model_at_init_equals_the_model_without_and_gamma_is_sigma(moe):
    plain, reparam = build(False, moe), build(True, moe)
    plain_params = dict(plain.named_parameters())
    for name, param in reparam.named_parameters():
        if "sigma_" not in name:
            assert torch.equal(param, plain_params[name]), name  # the same draws: nothing extra from the RNG
    # W_hat = W exactly: gamma is u^T W v with the very u, v the forward uses.
    torch.testing.assert_close(reparam(tokens()), plain(tokens()), rtol=4 * EPS32, atol=0)

    specs = list(reparametrized(reparam))
    # Attention 4, FFN or (router, dispatch 2, shared 3, shared gate, experts 2) per layer, head.
    assert len(specs) == 3 * 4 + (3 + 2 * 9 if moe else 3 * 3) + 1
    for module, spec in specs:
        W = spec.matrices(getattr(module, spec.weight).detach())
        exact = torch.linalg.matrix_norm(W.double(), ord=2)
        gamma = getattr(module, spec.gamma).detach().double().reshape(exact.shape)
        # Power iteration's error bound: a start's tan^2 (~n for a random one) times ratio^(2 steps).
        singular = torch.linalg.svdvals(W.double())
        ratio = (singular[..., 1] / singular[..., 0]).max().item() if singular.shape[-1] > 1 else 0.0
        bound = fp32_tolerance(W) + max(W.shape[-2:]) * ratio ** (2 * INIT_ITERATIONS)
        torch.testing.assert_close(gamma, exact, rtol=bound, atol=0, msg=f"{spec.weight}")


def test_under_bf16_autocast_it_computes_what_the_plain_model_does_within_bf16_rounding():
    """Sigma from the bf16-rounded weight (as FSDP gathers it), W_hat rounded back to bf16."""
    plain, reparam = build(False, True), build(True, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, expected = reparam(tokens()), plain(tokens())
    assert logits.dtype == torch.bfloat16
    # gamma / sigma is 1 within bf16's relative step (sigma of the bf16 weights), and W_hat rounds back
    # to bf16: at most one bf16 step of the logits (measured: bitwise equal; the plain model's bf16
    # logits are 9e-3 of their scale from its fp32 ones).
    scale = expected.float().abs().max().item()
    torch.testing.assert_close(logits.float(), expected.float(), rtol=0, atol=2**-8 * scale)


def test_a_bf16_gathered_weight_computes_what_the_fp32_weight_does_under_autocast():
    """FSDP's mixed precision gathers bf16 weights; one process holds fp32 ones under autocast:
    both must compute the same W_hat (sigma of the bf16-rounded weight), in bf16."""
    experts = build(True, True).layers["1"].feed_forward.experts
    gathered = copy.deepcopy(experts)
    with torch.no_grad():
        gathered.w13.data = gathered.w13.data.bfloat16()
        gathered.w2.data = gathered.w2.data.bfloat16()
        experts.sigma_gamma13.mul_(1.5)  # away from 1, so that sigma's rounding shows in W_hat
        gathered.sigma_gamma13.mul_(1.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for held, as_gathered in zip(experts.weights(), gathered.weights(), strict=True):
            assert held.dtype == as_gathered.dtype == torch.bfloat16
            assert torch.equal(held, as_gathered)


def test_init_of_a_pipeline_stage_is_what_one_process_computes():
    whole = build(True, True)
    stage = build(True, True)
    del stage.layers["0"]  # the second stage of a pipeline holds layers 1 and 2 only
    stage.tok_embeddings = None
    with torch.no_grad():
        for name, tensor in [*stage.named_buffers(), *stage.named_parameters()]:
            if "sigma_" in name:
                tensor.zero_()
    init_sigma_reparam(stage)
    expected = {**dict(whole.named_buffers()), **dict(whole.named_parameters())}
    for name, tensor in [*stage.named_buffers(), *stage.named_parameters()]:
        if "sigma_" in name:
            assert torch.equal(tensor, expected[name]), name


def test_sigma_scales_the_forward_and_its_gradient_reaches_gamma():
    model = build(True, True)
    layer = model.layers["1"].feed_forward
    with torch.no_grad():
        layer.experts.sigma_gamma2[1] *= 3.0  # expert 1's w2 computes with 3 W
        model.layers["0"].attention.wq.sigma_gamma.mul_(0.5)
    W_hat = layer.experts.weights()[1]
    torch.testing.assert_close(W_hat[1], 3.0 * layer.experts.w2[1], rtol=4 * EPS32, atol=0)
    torch.testing.assert_close(W_hat[0], layer.experts.w2[0], rtol=4 * EPS32, atol=0)
    wq = model.layers["0"].attention.wq
    torch.testing.assert_close(wq.computed_weight(), 0.5 * wq.weight, rtol=4 * EPS32, atol=0)
    model(tokens()).square().mean().backward()
    for module, spec in reparametrized(model):
        assert getattr(module, spec.gamma).grad.abs().sum() > 0, spec.gamma
        assert getattr(module, spec.u).grad is None  # buffers: constants of the forward


def test_the_gradient_flows_through_sigma_with_u_and_v_constant():
    """A ReparamLinear's gradients against autograd of gamma / (u^T W v) * W in fp64."""
    torch.manual_seed(3)
    layer = ReparamLinear(11, 7)
    u, v = F.normalize(torch.randn(7), dim=0), F.normalize(torch.randn(11), dim=0)
    with torch.no_grad():
        layer.weight.normal_()
        layer.sigma_u.copy_(u)
        layer.sigma_v.copy_(v)
        layer.sigma_gamma.fill_(1.7)
    x, g = torch.randn(5, 11), torch.randn(5, 7)
    (layer(x) * g).sum().backward()

    W = layer.weight.detach().double().requires_grad_()
    gamma = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    W_hat = gamma / (u.double() @ W @ v.double()) * W
    ((x.double() @ W_hat.T) * g.double()).sum().backward()
    # fp32 sums of 11 and 77 terms: well within 1e-5 of the fp64 values.
    torch.testing.assert_close(layer.weight.grad.double(), W.grad, rtol=1e-5, atol=1e-5 * W.grad.abs().max().item())
    torch.testing.assert_close(layer.sigma_gamma.grad.double(), gamma.grad.view(1), rtol=1e-5, atol=0)
    # The sigma path matters: without it the gradient would be (gamma / sigma) G_hat alone.
    plain = gamma.item() / (u.double() @ W.detach() @ v.double()) * (g.double().T @ x.double())
    assert (plain - W.grad).abs().max() > 100 * 1e-5 * W.grad.abs().max()


def test_activation_checkpointing_gives_bitwise_the_same_gradients():
    plain = build(True, True)
    checkpointed = copy.deepcopy(plain)
    apply_ac(checkpointed)
    for model in (plain, checkpointed):
        parallel_sigma.power_iteration_step(model)  # as a step starts: u moved, then forwards
        torch.nn.functional.cross_entropy(model(tokens()).flatten(0, 1), tokens(2).flatten()).backward()
    grads = {name: p.grad for name, p in plain.named_parameters()}
    for name, param in checkpointed.named_parameters():
        assert torch.equal(param.grad, grads[name.replace("_checkpoint_wrapped_module.", "")]), name


def test_gammas_are_not_decayed():
    model = build(True, True)
    decayed = {id(p) for group in param_groups(model, 0.1) if group["weight_decay"] > 0 for p in group["params"]}
    names = [name for name, p in model.named_parameters() if "sigma_gamma" in name]
    assert names and not any(id(p) in decayed for name, p in model.named_parameters() if name in names)
    assert id(model.layers["0"].attention.wq.weight) in decayed


SMALL = [
    "data.max_documents=200",
    "data.seq_len=32",
    "model.n_layers=2",
    "model.dim=64",
    "model.ffn_hidden=256",
    "trainer.micro_batch_size=2",
    "trainer.grad_accum_steps=2",
    "trainer.eval_batches=1",
    "trainer.eval_interval=0",
    "checkpoint.interval=1",
    "checkpoint.keep_last=0",
    "metrics.log_interval=1",
    "metrics.console=none",
    "model.sigma_reparam=true",
]


def job(run_dir, *overrides, steps=2):
    return load_job_config("tiny", [*SMALL, f"trainer.steps={steps}", f"trainer.run_dir={run_dir}", *overrides])


def vectors(model) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in model.named_buffers() if "sigma_" in name}


def test_u_moves_once_per_step_and_survives_a_resume(tmp_path, monkeypatch):
    calls = []
    step = parallel_sigma.power_iteration_step
    monkeypatch.setattr("sparsetron.parallel.step.power_iteration_step", lambda m: calls.append(1) or step(m))

    straight = Trainer(job(tmp_path / "straight"))
    at_init = vectors(straight.model)
    result = straight.run()
    assert len(calls) == 2  # two steps of two micro-batches: once a step, not once a forward
    after = vectors(straight.model)
    assert all(not torch.equal(after[name], at_init[name]) for name in after)

    first = Trainer(job(tmp_path / "split", "trainer.stop_at=1")).run()
    resumed_trainer = Trainer(job(tmp_path / "split"), resume="auto")
    resumed = resumed_trainer.run()
    assert {**first.losses, **resumed.losses} == result.losses  # bitwise: u and v came back exactly
    assert all(torch.equal(b, after[name]) for name, b in vectors(resumed_trainer.model).items())


def test_hf_export_and_upcycling_refuse_it_by_name():
    model, attn, moe = configs(True, True)
    with pytest.raises(ConfigError, match="model.sigma_reparam"):
        export_family(model, attn, MoEConfig(num_experts=4, top_k=2, n_shared_experts=1, shared_expert_gate=True))
    dense, _, _ = configs(False, False)
    with pytest.raises(UpcycleError, match="model.sigma_reparam"):
        plan_upcycle(dense, attn, model, attn, MoEConfig(num_experts=4, top_k=2))
