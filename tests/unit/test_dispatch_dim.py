"""Low-dimension dispatch (moe.dispatch_dim, BigMac's descend-communicate-communicate-ascend):
the MoE layer, its config, what counts it (FLOPs, memory plan) and the paths that refuse it.
tests/distributed/test_dispatch_dim.py trains it at parallel layouts.

Shape legend: T tokens, D model dim, R dispatch_dim, E experts, H expert hidden size.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from memory_probe import kept_bytes
from tolerance import assert_within_dtype_error

from sparsetron.launch.cli import main
from sparsetron.model.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig
from sparsetron.model.hf import save_hf
from sparsetron.model.hf.config import export_family
from sparsetron.model.moe import MoE
from sparsetron.model.params import active_params, num_params
from sparsetron.model.transformer import Transformer, uses_moe
from sparsetron.model.upcycle import UpcycleError, plan_upcycle
from sparsetron.parallel.dims import ParallelDims
from sparsetron.parallel.memory import memory_plan
from sparsetron.train.config_io import load_job_config
from sparsetron.train.flops import flops_per_token

D, R = 24, 8
MODEL = ModelConfig(dim=D, ffn_hidden=40)
# Shared experts with a gate, so that every path around the dispatcher runs.
MOE = MoEConfig(num_experts=4, top_k=1, granularity=2, n_shared_experts=1, shared_expert_gate=True)


def layer(dispatch_dim=0, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    moe = MoE(D, MODEL, replace(MOE, dispatch_dim=dispatch_dim)).to(dtype)
    moe.init_weights(0.3, 0.2)  # large enough that the outputs are far from zero
    return moe


def forward_backward(moe, x_BSD):
    """Output and the gradients of a random linear function of it w.r.t. x and every parameter."""
    x_BSD = x_BSD.detach().clone().requires_grad_(True)
    y_BSD = moe(x_BSD)
    probe = torch.randn(y_BSD.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (y_BSD * probe.to(y_BSD.dtype)).sum().backward()
    grads = {name: p.grad for name, p in moe.named_parameters()}
    return y_BSD.detach(), x_BSD.grad, grads


def with_identity_projections(plain: MoE) -> MoE:
    """A dispatch_dim = D layer holding `plain`'s router, experts and shared experts, projecting by I."""
    full = MoE(D, MODEL, replace(MOE, dispatch_dim=D)).to(plain.router.gate.weight.dtype)
    state = {**copy.deepcopy(plain.state_dict())}
    eye = torch.eye(D, dtype=plain.router.gate.weight.dtype)
    state["dispatch_down.weight"], state["dispatch_up.weight"] = eye, eye.clone()
    full.load_state_dict(state)
    return full


def test_full_width_identity_projections_reproduce_the_plain_layer():
    # x I and y I are exact in any summation order (products by 1 and 0, sums with exact zeros),
    # so the forward is bitwise the plain layer's. The input's gradient adds the routed rows'
    # share to the router's and shared experts' in another order, and so may differ by rounding:
    # it is held to the plain layer's own fp32 error against fp64.
    plain = layer()
    x_BSD = torch.randn(3, 10, D)
    y, dx, grads = forward_backward(plain, x_BSD)
    y_full, dx_full, grads_full = forward_backward(with_identity_projections(plain), x_BSD)
    assert torch.equal(y_full, y)
    _, dx64, grads64 = forward_backward(copy.deepcopy(plain).double(), x_BSD.double())
    assert_within_dtype_error("input gradient", dx_full, dx64, dx)
    for name, grad in grads.items():
        assert_within_dtype_error(name, grads_full[name], grads64[name], grad)


def test_the_dispatcher_moves_r_wide_rows_and_experts_compute_in_r():
    moe = layer(R)
    assert moe.experts.w13.shape == (moe.num_experts, R, 2 * moe.experts.hidden)
    assert moe.experts.w2.shape == (moe.num_experts, moe.experts.hidden, R)
    assert moe.dispatch_down.weight.shape == (R, D) and moe.dispatch_up.weight.shape == (D, R)
    widths = []
    run = moe.dispatcher.run

    def recording_run(x_TD, *args):
        widths.append(x_TD.shape[-1])
        routed, shared, dropped = run(x_TD, *args)
        widths.append(routed.shape[-1])
        return routed, shared, dropped

    moe.dispatcher.run = recording_run
    y, _, _ = forward_backward(moe, torch.randn(2, 7, D))
    assert y.shape == (2, 7, D)
    assert widths == [R, R]


def test_projection_gradients_are_those_of_the_function():
    # The router reads the layer's input, not the projection: routing cannot change with the
    # projection weights, so the layer is smooth in them and gradcheck (fp64) applies.
    moe = layer(R, dtype=torch.float64)
    x_TD = torch.randn(9, D, dtype=torch.float64)
    down, up = moe.dispatch_down.weight, moe.dispatch_up.weight

    def f(w_down, w_up):
        params = {"dispatch_down.weight": w_down, "dispatch_up.weight": w_up}
        return torch.func.functional_call(moe, params, (x_TD,))

    assert torch.autograd.gradcheck(f, (down.detach().requires_grad_(), up.detach().requires_grad_()), fast_mode=True)
    _, _, grads = forward_backward(moe, x_TD)
    assert grads["dispatch_down.weight"].abs().min() > 0 and grads["dispatch_up.weight"].abs().min() > 0


def test_the_residual_writer_takes_the_depth_scaled_std():
    torch.manual_seed(0)
    moe = MoE(D, replace(MODEL, dim=D), replace(MOE, dispatch_dim=R, granularity=8, num_experts=8))
    moe.init_weights(std=0.2, out_std=0.02)
    assert moe.dispatch_up.weight.std().item() == pytest.approx(0.02, rel=0.15)
    assert moe.dispatch_down.weight.std().item() == pytest.approx(0.2, rel=0.15)
    # The experts' w2 now feeds the ascending projection, not the residual stream.
    assert moe.experts.w2.std().item() == pytest.approx(0.2, rel=0.1)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["moe.dispatch_dim=129"], "model.dim=128"),
        (["moe.dispatch_dim=-4"], "got -4"),
        (["moe.dispatch_dim=32", "moe.num_experts=0"], "num_experts=0"),
    ],
)
def test_bad_dispatch_dim_is_refused_by_name(overrides, named):
    with pytest.raises(ConfigError, match="moe.dispatch_dim") as info:
        load_job_config("tiny", overrides)
    assert named in str(info.value)


def test_dispatch_dim_fixes_the_checkpoint_shape():
    # A resumed run may not change it (train/resume.py reads SHAPE_FIELDS), nor may upcycling ignore it.
    assert "dispatch_dim" in MoEConfig.SHAPE_FIELDS
    for r in (1, 128):
        assert load_job_config("tiny", [f"moe.dispatch_dim={r}"]).moe.dispatch_dim == r


# ---- what counts it -----------------------------------------------------------------------


def tiny(*overrides):
    job = load_job_config("tiny", ["model.vocab_size=320", "attention.document_masking=false", *overrides])
    torch.manual_seed(0)
    model = Transformer(job.model, job.attention, job.moe)
    model.init_weights()
    return job, model


@pytest.mark.parametrize("r", [32, 128])
def test_flops_count_the_projections_and_the_narrow_experts(r):
    # What one token multiplies with, counted from the built model: every non-embedding weight
    # but the routed experts it is not sent to.
    job, model = tiny(f"moe.dispatch_dim={r}")
    moe = job.moe
    idle = 0
    for i, block in model.layers.items():
        if uses_moe(int(i), moe):
            experts = block.feed_forward.experts
            per_expert = (experts.w13.numel() + experts.w2.numel()) // moe.routed_experts
            idle += (moe.routed_experts - moe.experts_per_token) * per_expert
    touched = num_params(model, exclude_embeddings=True) - idle
    assert active_params(job.model, job.attention, moe) == touched
    head_dim = job.attention.head_size(job.model.dim)
    args = (job.model.n_layers, job.attention.n_heads, head_dim, job.data.seq_len)
    assert flops_per_token(touched, *args) - flops_per_token(0, *args) == 6 * touched


def saved_bytes(model, job, dtype):
    tokens = torch.randint(0, 256, (2, job.data.seq_len))

    def run():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = model(tokens)
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())

    return kept_bytes(run, [*model.parameters(), *model.buffers()])


def plan(job, model, dtype):
    dims = ParallelDims(world_size=1)
    return memory_plan(model, job.model, job.attention, job.moe, dims, 2, job.data.seq_len, dtype.itemsize, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_plan_counts_the_projections(dtype):
    # Parameters exactly; activations within 10% as for every model (tests/unit/test_memory_plan.py),
    # and in fp32 what dispatch_dim changes (narrow rows, the projections' inputs) exactly: the
    # difference to the plain model isolates these terms from the rest of the estimate's error.
    job, model = tiny("moe.dispatch_dim=32")
    p = plan(job, model, dtype)
    assert p.parameters == sum(t.numel() for t in model.parameters())
    measured = saved_bytes(model, job, dtype)
    assert 1 / 1.1 <= p.activation_bytes / measured <= 1.1, (p.activation_bytes, measured)
    if dtype == torch.float32:
        plain_job, plain_model = tiny()
        change = plan(plain_job, plain_model, dtype).activation_bytes - p.activation_bytes
        assert change == saved_bytes(plain_model, plain_job, dtype) - measured


# ---- refused where no model has it --------------------------------------------------------


def test_hugging_face_export_refuses_it_by_name(tmp_path):
    model = ModelConfig(vocab_size=320, dim=64, n_layers=2, ffn_hidden=96, max_seq_len=128)
    attention = AttentionConfig(n_heads=4)
    moe = MoEConfig(num_experts=4, norm_topk_prob=True, dispatch_dim=16)  # mixtral but for dispatch_dim
    assert export_family(model, attention, replace(moe, dispatch_dim=0)) == "mixtral"
    with torch.device("meta"):
        state = Transformer(model, attention, moe).state_dict()
    with pytest.raises(ConfigError, match="moe.dispatch_dim=16") as info:
        save_hf(tmp_path / "out", model, attention, moe, state)
    assert "no Hugging Face family" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_cli_export_of_a_checkpoint_with_it_is_refused_before_reading_tensors(tmp_path, capsys, monkeypatch):
    from sparsetron.train import hf_convert
    from sparsetron.train.checkpoint import CheckpointManager
    from sparsetron.train.step0 import save_step0

    job, model = tiny("moe.dispatch_dim=32", "moe.n_shared_experts=0", "moe.norm_topk_prob=true")
    save_step0(CheckpointManager(tmp_path / "ck"), model, job)
    monkeypatch.setattr(hf_convert, "materialised_transformer", lambda *a: pytest.fail("built a model"))
    assert main(["convert", "--from", str(tmp_path / "ck"), "--to", str(tmp_path / "hf"), "--format", "hf"]) == 2
    assert "moe.dispatch_dim=32" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_upcycling_refuses_it_by_name(tmp_path, capsys, monkeypatch):
    job = load_job_config("tiny", ["moe.dispatch_dim=32"])
    dense = replace(job.model)
    with pytest.raises(UpcycleError, match="moe.dispatch_dim=32"):
        plan_upcycle(dense, job.attention, job.model, job.attention, job.moe)
    # The command line: a dense checkpoint of tiny's shape, refused before its tensors are read.
    from sparsetron.train.checkpoint import CheckpointManager
    from sparsetron.train.step0 import save_step0

    dense_job, dense_model = tiny("moe.num_experts=0")
    save_step0(CheckpointManager(tmp_path / "dense"), dense_model, dense_job)
    monkeypatch.setattr(CheckpointManager, "load", lambda *a, **k: pytest.fail("read the dense tensors"))
    args = ["upcycle", "--from", str(tmp_path / "dense"), "--recipe", "tiny", "--out", str(tmp_path / "moe")]
    assert main([*args, "--set", "moe.dispatch_dim=32"]) != 0
    assert "moe.dispatch_dim=32" in capsys.readouterr().err
    assert not any((tmp_path / "moe").glob("step_*"))


def test_hugging_face_import_refuses_it_by_name(tmp_path, capsys):
    # The model sections of an import come from config.json; asking for the projections is refused
    # before the source is even looked at (it need not exist).
    args = ["convert", "--from", str(tmp_path / "hf"), "--to", str(tmp_path / "ck"), "--format", "sparsetron"]
    assert main([*args, "--set", "moe.dispatch_dim=32"]) == 2
    assert "moe.dispatch_dim=32" in capsys.readouterr().err
    assert not (tmp_path / "ck").exists()
