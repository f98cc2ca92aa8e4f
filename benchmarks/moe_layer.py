"""One MoE layer side by side: sparsetron, transformers' Qwen3MoeSparseMoeBlock, megatron-core's
MoELayer and a plain grouped_mm layer, at a granularity sweep of equal FLOPs.

All compute the same function (softmax router, top-k, renormalised weights, SwiGLU experts): the
script copies sparsetron's weights into every peer and checks outputs (and, in fp32, input
gradients) against transformers' before timing anything. Granularity G multiplies the experts and
top-k by G and divides the expert hidden size by G, so every G does the same FLOPs. Prints, per
dtype and G, each peer's forward and forward+backward time and its ratio to sparsetron's
(peer ms / sparsetron ms: above 1 means sparsetron is faster).

    python benchmarks/moe_layer.py                  # GPU: the anchor shapes (64 experts, top-6, d 2048), bf16
    python benchmarks/moe_layer.py --device cpu     # 4096 tokens, d 256, 16 experts of 128, top-4, fp32
    python benchmarks/moe_layer.py --device cpu --dtype fp32 bf16 --granularity 1 4 16
    # on a CPU shared with other jobs: one thread, the process's CPU time (see --clock)
    python benchmarks/moe_layer.py --device cpu --dtype fp32 bf16 --granularity 1 4 16 --threads 1 --clock process

On a CPU the script restarts itself once with THP_MEM_ALLOC_ENABLE=1 (as `sparsetron train`
does, `launch.cli.use_cpu_huge_pages`; THP_MEM_ALLOC_ENABLE=0 opts out), so every peer runs with
the same allocator, and says which it ran with. CPU timings interleave the peers, one timed call
of each per round (after an untimed one), so that load from other processes falls on all of them
alike.

Needs `pip install -e ".[dev]"` (transformers). megatron-core is optional (`pip install
megatron-core`, 0.16 on Python 3.11); without it its rows are left out, with a note. The CI does
not install it, and the test of megatron's rows skips without it.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import torch.nn.functional as F
from report import cpu_interleaved_ms
from torch import nn

from sparsetron.kernels.grouped_mm import resolve_swiglu_backend
from sparsetron.launch.cli import THP_VAR, use_cpu_huge_pages
from sparsetron.model.config import ModelConfig, MoEConfig
from sparsetron.model.moe.layer import MoE

# Shape legend: B batch, S sequence, T tokens, D model dim, E experts, k experts per token,
# A = T * k assignments, H expert hidden size.

GPU_SHAPES = {"tokens": 16384, "dim": 2048, "experts": 64, "top_k": 6, "hidden": 1408}
CPU_SHAPES = {"tokens": 4096, "dim": 256, "experts": 16, "top_k": 4, "hidden": 128}
SPARSETRON = "sparsetron"
HF = "transformers Qwen3MoeSparseMoeBlock"


def granular(args, G: int) -> argparse.Namespace:
    """The shape at granularity G: G x the experts and top-k, hidden / G (equal FLOPs)."""
    if args.hidden % G:
        raise SystemExit(f"--granularity {G} must divide the expert hidden size {args.hidden}")
    return argparse.Namespace(**{**vars(args), "experts": args.experts * G, "top_k": args.top_k * G,
                                 "hidden": args.hidden // G})  # fmt: skip


def sparsetron_layer(shape, backend: str) -> MoE:
    moe_cfg = MoEConfig(
        num_experts=shape.experts,
        top_k=shape.top_k,
        expert_hidden=shape.hidden,
        norm_topk_prob=True,
        expert_backend=backend,
    )
    layer = MoE(shape.dim, ModelConfig(dim=shape.dim, ffn_hidden=shape.hidden), moe_cfg)
    layer.init_weights(0.02, 0.02)
    return layer.to(shape.device, shape.dtype)


def hf_block_like(layer: MoE, shape):
    """The Hugging Face block holding `layer`'s weights (its default, eager experts: one per hit expert)."""
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = Qwen3MoeConfig(
        hidden_size=shape.dim,
        moe_intermediate_size=shape.hidden,
        num_experts=shape.experts,
        num_experts_per_tok=shape.top_k,
        norm_topk_prob=True,
    )
    block = Qwen3MoeSparseMoeBlock(config).to(shape.device, shape.dtype)
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.gate.weight)
        # sparsetron stores x @ w ([E, D, 2H], gate then up); Hugging Face stores linear weights ([E, 2H, D]).
        block.experts.gate_up_proj.copy_(layer.experts.w13.transpose(1, 2))
        block.experts.down_proj.copy_(layer.experts.w2.transpose(1, 2))
    return block


_torch_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _grouped_mm(x_AD: torch.Tensor, w_EDH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    # torch's kernel takes fp32/bf16/fp16 rows and weights whose rows are 16-byte aligned.
    aligned = all(t.shape[-1] * t.element_size() % 16 == 0 for t in (x_AD, w_EDH))
    if _torch_grouped_mm is not None and aligned and x_AD.dtype != torch.float64:
        return _torch_grouped_mm(x_AD, w_EDH, offs=counts_E.cumsum(0).to(torch.int32))
    pieces = x_AD.split(counts_E.tolist())
    return torch.cat([x_nD @ w_DH for x_nD, w_DH in zip(pieces, w_EDH.unbind(0), strict=True)])


class PlainGroupedMoE(nn.Module):
    """The simplest honest grouped-GEMM MoE layer, in the manner of torchtitan's: fp32 router, one
    argsort of the assignments by expert, a gather of the tokens, torch's grouped_mm for the
    gate/up and down products (a per-expert loop where torch has none), weights applied to the
    expert outputs, `index_add_` back to token order in the compute dtype. No capacity, no
    load-balancing loss, no statistics: the floor any layer's bookkeeping is measured against."""

    def __init__(self, layer: MoE):
        super().__init__()
        self.top_k = layer.top_k
        self.gate = nn.Parameter(layer.router.gate.weight.detach().clone())
        self.w13 = nn.Parameter(layer.experts.w13.detach().clone())
        self.w2 = nn.Parameter(layer.experts.w2.detach().clone())

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        probs_TE = F.linear(x_TD.float(), self.gate.float()).softmax(-1)
        weights_Tk, experts_Tk = probs_TE.topk(self.top_k, dim=-1)
        weights_Tk = weights_Tk / weights_Tk.sum(-1, keepdim=True)
        order_A = experts_Tk.flatten().argsort(stable=True)
        counts_E = torch.bincount(experts_Tk.flatten(), minlength=self.w13.shape[0])
        token_A = order_A // self.top_k
        h13_AH2 = _grouped_mm(x_TD.index_select(0, token_A), self.w13, counts_E)
        h1_AH, h3_AH = h13_AH2.chunk(2, dim=-1)
        y_AD = _grouped_mm(F.silu(h1_AH) * h3_AH, self.w2, counts_E)
        y_AD = y_AD * weights_Tk.flatten().index_select(0, order_A).unsqueeze(-1).to(y_AD.dtype)
        return torch.zeros_like(x_TD).index_add_(0, token_A, y_AD).view(x_BSD.shape)


# --- megatron-core on one process, without Transformer Engine, on a CPU or a GPU ---


def _patch_megatron(device: str) -> None:
    """The fewest changes under which megatron-core 0.16's MoELayer runs without Transformer
    Engine or the `grouped_gemm` package, and on a CPU without CUDA; none of them changes what
    the layer computes."""
    from types import SimpleNamespace

    from megatron.core.transformer.moe import grouped_gemm_util, moe_utils, router
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    # moe_utils imports Transformer Engine's GEMM in a try whose except forgets to define the
    # name, so the router's linear raises NameError without TE; None selects its torch.mm path.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    # GroupedMLP's grouped GEMM comes from the `grouped_gemm` CUDA package; torch's grouped_mm
    # (also fp32 and bf16 on a CPU since torch 2.9) computes the same product.
    def gmm(a_AD, b_EDH, batch_sizes_E, trans_b=False):
        b_EDH = b_EDH.transpose(1, 2) if trans_b else b_EDH
        return _torch_grouped_mm(a_AD, b_EDH, offs=batch_sizes_E.cumsum(0).to(a_AD.device, torch.int32))

    if grouped_gemm_util.grouped_gemm is None and _torch_grouped_mm is not None:
        grouped_gemm_util.grouped_gemm = SimpleNamespace(ops=SimpleNamespace(gmm=gmm))
        grouped_gemm_util.ops = grouped_gemm_util.grouped_gemm.ops
    if device != "cpu":
        return

    # The router's gating moves a CPU-resident weight to the current CUDA device on every call.
    # This is the same gating minus that move.
    def gating(self, x):
        dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(self.config.moe_router_dtype, x.dtype)
        return moe_utils.router_gating_linear(x, self.weight, self.bias, dtype)

    router.Router.gating = gating
    # The all-to-all dispatcher makes a CUDA stream to copy token counts to the host; on a CPU
    # they are host tensors already, so the copy and its sync are nothing, and no stream is made.
    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = object()
    MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = lambda self, point, tokens_per_expert=None: (
        tokens_per_expert
    )


def megatron_ready(device: str) -> str | None:
    """None once megatron-core can build layers in this process (one rank, gloo on a CPU), else why not."""
    try:
        import megatron.core  # noqa: F401
    except ImportError:
        return "megatron-core not installed (pip install megatron-core)"
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        # One rank: no port to pick, nothing to reach.
        dist.init_process_group("gloo" if device == "cpu" else "nccl", store=dist.HashStore(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    _patch_megatron(device)
    return None


class _SequenceFirst(nn.Module):
    """megatron's layers take [S, B, D] and return (output, bias); this takes and returns [B, S, D]."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        y_SBD, _ = self.layer(x_BSD.transpose(0, 1))
        return y_SBD.transpose(0, 1)


def megatron_layer_like(layer: MoE, shape, grouped: bool) -> nn.Module:
    """megatron-core's MoELayer (all-to-all dispatcher, no TE) holding `layer`'s weights: experts
    as SequentialMLP (one MLP per expert) or, grouped, as GroupedMLP (bf16 only, by its own rule)."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=1,
        hidden_size=shape.dim,
        num_attention_heads=1,
        ffn_hidden_size=shape.hidden,
        moe_ffn_hidden_size=shape.hidden,
        num_moe_experts=shape.experts,
        moe_router_topk=shape.top_k,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=False,  # softmax over the top-k logits: the renormalised top-k probabilities
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=grouped,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        bf16=shape.dtype == torch.bfloat16,
        params_dtype=shape.dtype,
        use_cpu_initialization=shape.device == "cpu",
        perform_initialization=False,  # the weights are copied in below
    )
    spec = get_moe_module_spec(use_te=False, num_experts=shape.experts, moe_grouped_gemm=grouped)
    moe = build_module(spec, config=config).to(shape.device)
    E, D = shape.experts, shape.dim
    with torch.no_grad():
        moe.router.weight.copy_(layer.router.gate.weight)
        if grouped:
            # GroupedMLP views weight1 [D, E*2H] as [E, D, 2H] and weight2 [E*H, D] as [E, H, D]: sparsetron's layout.
            moe.experts.weight1.copy_(layer.experts.w13.reshape(D, -1))
            moe.experts.weight2.copy_(layer.experts.w2.reshape(-1, D))
        else:
            for e in range(E):
                # linear weights [2H, D] (gate then up) and [D, H]
                moe.experts.local_experts[e].linear_fc1.weight.copy_(layer.experts.w13[e].T)
                moe.experts.local_experts[e].linear_fc2.weight.copy_(layer.experts.w2[e].T)
    return _SequenceFirst(moe)


# --- checks, timing, the table ---


def check_agreement(
    name: str, got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what="output", limit=0.02
) -> None:
    """Stop unless `got` computes the reference: every token within 1e-4 of the reference's scale in
    fp32. In bf16 the reference is transformers' block in fp32 on the same (bf16-valued) weights and
    input; a token whose top-k is a near tie may go to another expert where logits round
    differently, so tokens beyond 5e-2 of the scale are counted, and more than `limit` of them
    stops the run."""
    scale = expected.abs().max().item()
    errors_T = (got.float() - expected.float()).abs().flatten(0, -2).amax(-1)
    if dtype != torch.bfloat16:
        if errors_T.max().item() > 1e-4 * scale:
            raise SystemExit(
                f"{name} and the reference disagree ({what}): max error {errors_T.max().item():.3g} "
                f"> {1e-4 * scale:.3g}"
            )
        return
    off = int((errors_T > 5e-2 * scale).sum())
    print(f"{name}: {off} of {errors_T.numel()} tokens beyond 5e-2 of the fp32 reference's {what}")
    if off > limit * errors_T.numel():
        raise SystemExit(f"{name} and the fp32 reference disagree on {off} of {errors_T.numel()} tokens (> 2%)")


def candidates(shape, notes: list[str]) -> dict[str, nn.Module]:
    """Every peer at this shape, sparsetron first, each holding the same weights."""
    ours = sparsetron_layer(shape, "auto")
    x_TD = torch.empty(1, shape.dim, device=shape.device, dtype=shape.dtype)
    chosen = resolve_swiglu_backend(x_TD, ours.experts.w13, ours.experts.w2, "auto")
    found = {SPARSETRON: ours}
    width = torch.finfo(shape.dtype).bits // 8
    aligned = all(n * width % 16 == 0 for n in (shape.dim, shape.hidden))  # torch's kernel's rule
    if _torch_grouped_mm is not None and chosen == "loop" and aligned:
        # What sparsetron would take with torch's grouped_mm where "auto" keeps the loop.
        other = sparsetron_layer(shape, "grouped_mm")
        other.load_state_dict(ours.state_dict())
        found[f"{SPARSETRON} (grouped_mm backend)"] = other
    found[HF] = hf_block_like(ours, shape)
    found["plain grouped_mm layer"] = PlainGroupedMoE(ours).to(shape.device, shape.dtype)
    why_not = megatron_ready(shape.device)
    if why_not is not None:
        notes.append(f"megatron-core: {why_not}")
    else:
        found["megatron-core MoELayer (SequentialMLP)"] = megatron_layer_like(ours, shape, grouped=False)
        if shape.dtype == torch.bfloat16 and _torch_grouped_mm is not None and aligned:
            found["megatron-core MoELayer (GroupedMLP)"] = megatron_layer_like(ours, shape, grouped=True)
    return found


def check_all(found: dict[str, nn.Module], x: torch.Tensor, grad: torch.Tensor, dtype: torch.dtype) -> None:
    """Every candidate against transformers' block: outputs, and in fp32 the input gradient too.
    In bf16 the reference is that block in fp32 (see check_agreement). Every other peer routes in
    fp32, so its routing matches the reference's and at most 2% of tokens may differ (0 measured);
    transformers' bf16 block routes on bf16 logits, which flips near ties by the hundred at fine
    granularity (230 of 4096 tokens at G=16, top-64), so its count is printed, not limited: its
    fp32 run, gradients included, is what shows it computes the same function."""
    if dtype == torch.bfloat16:
        reference = copy.deepcopy(found[HF]).float()
        with torch.no_grad():
            expected = reference(x.float())
            for name, module in found.items():
                check_agreement(name, module(x), expected, dtype, limit=1.0 if name == HF else 0.02)
        return
    with torch.no_grad():
        expected = found[HF](x)
        for name, module in found.items():
            if name != HF:
                check_agreement(name, module(x), expected, dtype)
    dx = {}
    for name, module in found.items():
        x_grad = x.detach().requires_grad_()
        module(x_grad).backward(grad)
        dx[name] = x_grad.grad
        module.zero_grad(set_to_none=True)
    for name, dx_ in dx.items():
        check_agreement(name, dx_, dx[HF], dtype, what="input gradient")


def time_all(found: dict[str, nn.Module], x, grad, device: str, reps: int, clock=time.perf_counter) -> dict[str, tuple]:
    """{name: (fwd ms, fwd spread, fwd+bwd ms, fwd+bwd spread)}; spread is the interquartile range
    over the median (CPU), None on the GPU."""
    calls = {}
    for name, module in found.items():
        x_grad = x.detach().requires_grad_()

        def forward(module=module):
            with torch.no_grad():
                module(x)

        def forward_backward(module=module, x_grad=x_grad):
            module(x_grad).backward(grad)
            # Gradients accumulate otherwise, an add per parameter that a training step would not make.
            module.zero_grad(set_to_none=True)
            x_grad.grad = None

        calls[name] = (forward, forward_backward)
    # Warm every candidate up before timing any, so that none pays the process's first-use costs.
    for forward, forward_backward in calls.values():
        forward()
        forward_backward()
    if device == "cuda":
        import triton.testing

        return {
            name: (triton.testing.do_bench(f, return_mode="median"), None,
                   triton.testing.do_bench(fb, return_mode="median"), None)
            for name, (f, fb) in calls.items()
        }  # fmt: skip
    fwd = cpu_interleaved_ms({name: f for name, (f, _) in calls.items()}, reps=reps, settle=1, clock=clock)
    fwd_bwd = cpu_interleaved_ms({name: fb for name, (_, fb) in calls.items()}, reps=reps, settle=1, clock=clock)
    return {name: (*_median_spread(fwd[name]), *_median_spread(fwd_bwd[name])) for name in calls}


def _median_spread(times: list[float]) -> tuple[float, float]:
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return median, (q3 - q1) / median


def table(shape, G: int, rows: dict[str, tuple]) -> str:
    ours_fwd, _, ours_fb, _ = rows[SPARSETRON]
    fwd_flops = 2 * 3 * shape.tokens * shape.top_k * shape.dim * shape.hidden

    def spread(s):
        return "" if s is None else f"±{50 * s:.0f}%"

    lines = [
        f"G={G}: {shape.tokens} tokens, d {shape.dim}, {shape.experts} experts of hidden {shape.hidden}, "
        f"top-{shape.top_k}, {str(shape.dtype).removeprefix('torch.')}",
        "| implementation | fwd ms | x of sparsetron | fwd+bwd ms | x of sparsetron | fwd+bwd GFLOP/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, (fwd, fwd_s, fb, fb_s) in rows.items():
        lines.append(
            f"| {name} | {fwd:.1f} {spread(fwd_s)} | {fwd / ours_fwd:.2f} | {fb:.1f} {spread(fb_s)} | "
            f"{fb / ours_fb:.2f} | {3 * fwd_flops / fb / 1e6:.3g} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", nargs="+", choices=["bf16", "fp32"], default=None,
                        help="default: bf16 on GPU, fp32 on CPU")  # fmt: skip
    parser.add_argument("--granularity", nargs="+", type=int, default=[1], help="G values; default 1")
    parser.add_argument("--reps", type=int, default=7, help="CPU: timed rounds per peer (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default: torch's choice)")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="CPU: wall time, or the process's CPU time (all threads; leaves out waiting "
                        "for a core on a shared machine)")  # fmt: skip
    for name in GPU_SHAPES:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    args = parser.parse_args(argv)
    if args.device == "cpu" and argv is None:
        use_cpu_huge_pages("cpu")
    defaults = GPU_SHAPES if args.device == "cuda" else CPU_SHAPES
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtypes = args.dtype or ["bf16" if args.device == "cuda" else "fp32"]

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    header = f"MoE layer on {device_name}, torch {torch.__version__}"
    if args.device == "cpu":
        header += f", {THP_VAR}={os.environ.get(THP_VAR, 'unset')} (huge pages {'on' if os.environ.get(THP_VAR) == '1' else 'off'})"
    print(header, flush=True)
    notes: list[str] = []
    tables = [header]
    for dtype_name in dtypes:
        for G in args.granularity:
            shape = granular(args, G)
            shape.dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
            torch.manual_seed(0)
            found = candidates(shape, notes)
            x = torch.randn(1, shape.tokens, shape.dim, device=shape.device, dtype=shape.dtype)
            grad = torch.randn_like(x)
            check_all(found, x, grad, shape.dtype)
            clock = time.process_time if args.clock == "process" else time.perf_counter
            tables.append(table(shape, G, time_all(found, x, grad, args.device, args.reps, clock)))
            print(tables[-1] + "\n", flush=True)
            del found
    if args.device == "cpu":
        tables.append(
            f"CPU: median {args.clock} time of {args.reps} interleaved rounds (each peer called twice in a row, "
            "the second timed); ± is half the interquartile range."
        )
        print(tables[-1])
    tables += sorted(set(notes))
    for note in sorted(set(notes)):
        print(note)
    return "\n\n".join(tables)


if __name__ == "__main__":
    main()
