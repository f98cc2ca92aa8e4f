"""What only a GPU exercises: torch's fused grouped_mm, bf16 autocast, MFU. Run: pytest -m gpu."""

import pytest
import torch
from tolerance import assert_within_dtype_error

from sparsetron.kernels.grouped_mm import (
    grouped_mm,
    grouped_mm_reference,
    grouped_swiglu,
    grouped_swiglu_reference,
    resolve_backend,
    resolve_swiglu_backend,
)
from sparsetron.model.config import ModelConfig, MoEConfig
from sparsetron.model.moe.dispatch import LocalDispatcher
from sparsetron.model.moe.layer import MoE
from sparsetron.train.config_io import load_job_config
from sparsetron.train.trainer import Trainer

pytestmark = pytest.mark.gpu


def hopper_or_newer():
    return torch.cuda.get_device_capability() >= (9, 0)


@pytest.mark.parametrize("counts", [[130, 0, 77, 301, 4, 0, 97, 415], [1024] * 8])
def test_fused_grouped_mm_matches_the_loop_in_bf16(counts):
    if not hopper_or_newer():
        pytest.skip("torch's fused grouped_mm needs compute capability 9.0")
    torch.manual_seed(0)
    T, D, H = sum(counts), 256, 176
    offsets = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    x64 = torch.randn(T, D, dtype=torch.float64, device="cuda")
    w64 = torch.randn(len(counts), D, H, dtype=torch.float64, device="cuda") / D**0.5
    g64 = torch.randn(T, H, dtype=torch.float64, device="cuda")

    def run(backend, dtype):
        x = x64.to(dtype).requires_grad_()
        w = w64.to(dtype).requires_grad_()
        y = grouped_mm(x, w, offsets, backend) if backend else grouped_mm_reference(x, w, offsets)
        y.backward(g64.to(dtype))
        return [t.double() for t in (y, x.grad, w.grad)]

    assert resolve_backend(x64.bfloat16(), w64.bfloat16()) == "grouped_mm"
    exact = run(None, torch.float64)
    loop = run("loop", torch.bfloat16)
    fused = run("grouped_mm", torch.bfloat16)
    for name, e, lp, f in zip(("y", "dx", "dw"), exact, loop, fused, strict=True):
        loop_err = (lp - e).abs().max().item()
        fused_err = (f - e).abs().max().item()
        assert fused_err <= 2 * loop_err + 1e-6, (name, fused_err, loop_err)


@pytest.mark.parametrize("counts", [[130, 0, 77, 301, 4, 0, 97, 415], [1024] * 8])
def test_grouped_swiglu_explicit_backward_in_bf16(counts):
    """The written-out backward on both backends, with the routing weights as the per-row scale
    (fp32, as the MoE layer passes them): within MULTIPLE x torch's own bf16 error of fp64
    autograd of the reference, per element (tests/tolerance.py), output and every gradient."""
    torch.manual_seed(1)
    N, D, H = sum(counts), 256, 176
    offsets = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    x64 = torch.randn(N, D, dtype=torch.float64, device="cuda")
    w13_64 = torch.randn(len(counts), D, 2 * H, dtype=torch.float64, device="cuda") / D**0.5
    w2_64 = torch.randn(len(counts), H, D, dtype=torch.float64, device="cuda") / H**0.5
    dy64 = torch.randn(N, D, dtype=torch.float64, device="cuda")
    scale64 = torch.rand(N, dtype=torch.float64, device="cuda") * 0.95 + 0.05

    def run(backend, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x64, w13_64, w2_64)]
        leaves.append(scale64.detach().to(torch.promote_types(dtype, torch.float32)).requires_grad_())
        x, w13, w2, scale = leaves
        if backend:
            y = grouped_swiglu(x, w13, w2, offsets, backend, scale)
        else:
            y = grouped_swiglu_reference(x, w13, w2, offsets, scale)
        y.backward(dy64.to(dtype))
        return [y.detach()] + [t.grad for t in leaves]

    if hopper_or_newer():
        assert resolve_swiglu_backend(x64.bfloat16(), w13_64.bfloat16(), w2_64.bfloat16(), "auto") == "grouped_mm"
    exact = run(None, torch.float64)
    torch_own = run(None, torch.bfloat16)
    for backend in ("loop", "grouped_mm") if hopper_or_newer() else ("loop",):
        for name, got, e, t in zip(
            ("y", "dx", "dw13", "dw2", "dscale"), run(backend, torch.bfloat16), exact, torch_own, strict=True
        ):
            assert_within_dtype_error(f"{backend} {name}", got, e, t)


@pytest.mark.parametrize("capacity", [0.0, 0.8])
def test_combine_rounds_once_and_repeats_bitwise_in_bf16(capacity):
    """The combine (one embedding_bag sum per token) on CUDA: allowed under deterministic
    algorithms, bitwise the same twice, and each output the exact sum of its rows correctly
    rounded to bf16, up to fp32's own error (16 fp32 ulps of the summed magnitudes)."""
    torch.manual_seed(2)
    T, E, k, D = 3000, 64, 16, 256
    indices_Tk = torch.rand(T, E, device="cuda").topk(k, dim=-1).indices
    weights_Tk = torch.rand(T, k, device="cuda")
    dispatcher = LocalDispatcher(E, capacity, "position")
    x_perm, _, _, ctx = dispatcher.dispatch(torch.randn(T, D, device="cuda"), indices_Tk, weights_Tk)
    rows = torch.randn(x_perm.shape, device="cuda").bfloat16()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = dispatcher.combine(rows, ctx), dispatcher.combine(rows, ctx)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert first.dtype == torch.bfloat16 and torch.equal(first, second)
    terms = torch.cat([rows.double(), rows.new_zeros(1, D, dtype=torch.float64)])[ctx.slot_Tk]
    exact, magnitude = terms.sum(dim=1), terms.abs().sum(dim=1)
    excess = (first.double() - exact).abs() - torch.finfo(torch.bfloat16).eps / 2 * exact.abs()
    assert (excess - 16 * torch.finfo(torch.float32).eps * magnitude).max().item() <= 0


def test_moe_layer_bf16_autocast_close_to_fp64():
    torch.manual_seed(0)
    model_cfg = ModelConfig(dim=256, ffn_hidden=1024)
    moe_cfg = MoEConfig(num_experts=8, top_k=1, granularity=4, n_shared_experts=1, aux_loss_coeff=0.01)
    layer = MoE(256, model_cfg, moe_cfg).cuda()
    layer.init_weights(0.02, 0.01)
    x = torch.randn(4, 333, 256, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    reference = layer.double()(x.double())
    scale = reference.abs().max().item()
    assert (y.double() - reference).abs().max().item() <= 0.05 * scale


def test_training_on_gpu_learns_and_reports_mfu(tmp_path):
    job = load_job_config(
        "debug-deepseek",
        ["trainer.steps=30", "trainer.eval_interval=0", "metrics.console=none", f"trainer.run_dir={tmp_path}"],
    )
    trainer = Trainer(job)
    assert trainer.device.type == "cuda" and trainer.precision.compute_dtype == torch.bfloat16
    result = trainer.run()
    assert result.eval_losses[30] < 0.8 * result.eval_losses[0]
    records = (tmp_path / "metrics.jsonl").read_text()
    assert '"mfu"' in records and '"memory/max_allocated_gib"' in records


def test_async_save_staged_from_the_gpu_resumes_bitwise_in_bf16(tmp_path):
    """checkpoint.async_save copies CUDA tensors into CPU buffers while training goes on: the run
    stopped and resumed from such a save (at the GPU defaults, bf16 autocast) matches the straight run."""

    def job(run_dir, *extra):
        return load_job_config(
            "debug-deepseek",
            ["trainer.steps=8", "trainer.eval_interval=0", "metrics.console=none", "checkpoint.interval=3"]
            + ["checkpoint.async_save=true", f"trainer.run_dir={run_dir}", *extra],
        )

    straight_trainer = Trainer(job(tmp_path / "straight"))
    assert straight_trainer.device.type == "cuda" and straight_trainer.precision.compute_dtype == torch.bfloat16
    straight = straight_trainer.run()
    first = Trainer(job(tmp_path / "split", "trainer.stop_at=5")).run()
    assert first.step == 5 and (first.checkpoint / ".complete").is_file()
    resumed = Trainer(job(tmp_path / "split"), resume="auto").run()
    assert {**first.losses, **resumed.losses} == straight.losses
