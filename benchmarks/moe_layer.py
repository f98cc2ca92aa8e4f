"""One MoE layer, sparsetron against Hugging Face transformers' Qwen3MoeSparseMoeBlock.

Both compute the same function (softmax router, top-k, renormalised weights, SwiGLU
experts): the script copies sparsetron's weights into the Hugging Face block and checks
the outputs agree before timing anything. Prints a table of forward and forward+backward
times, TFLOP/s and the ratio to Hugging Face.

    python benchmarks/moe_layer.py                  # GPU: the anchor shapes (64 experts, top-6, d 2048)
    python benchmarks/moe_layer.py --device cpu     # small shapes, fp32
    python benchmarks/moe_layer.py --tokens 4096 --experts 32 --top-k 4 --dim 1024 --hidden 704

Needs `pip install -e ".[dev]"` (transformers).
"""

from __future__ import annotations

import argparse

import torch
from report import cpu_median_ms

from sparsetron.model.config import ModelConfig, MoEConfig
from sparsetron.model.moe.layer import MoE

GPU_SHAPES = {"tokens": 16384, "dim": 2048, "experts": 64, "top_k": 6, "hidden": 1408}
CPU_SHAPES = {"tokens": 2048, "dim": 256, "experts": 16, "top_k": 4, "hidden": 176}


def sparsetron_layer(args, backend: str) -> MoE:
    moe_cfg = MoEConfig(
        num_experts=args.experts,
        top_k=args.top_k,
        expert_hidden=args.hidden,
        norm_topk_prob=True,
        expert_backend=backend,
    )
    layer = MoE(args.dim, ModelConfig(dim=args.dim, ffn_hidden=args.hidden), moe_cfg)
    layer.init_weights(0.02, 0.02)
    return layer.to(args.device, args.dtype)


def hf_block_like(layer: MoE, args):
    """The Hugging Face block holding `layer`'s weights."""
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = Qwen3MoeConfig(
        hidden_size=args.dim,
        moe_intermediate_size=args.hidden,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
    )
    block = Qwen3MoeSparseMoeBlock(config).to(args.device, args.dtype)
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.gate.weight)
        # sparsetron stores x @ w ([E, D, 2H], gate then up); Hugging Face stores linear weights ([E, 2H, D]).
        block.experts.gate_up_proj.copy_(layer.experts.w13.transpose(1, 2))
        block.experts.down_proj.copy_(layer.experts.w2.transpose(1, 2))
    return block


def bench(fn, device: str) -> float:
    """Median milliseconds of fn()."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median")
    # The first calls pay for allocation and one-time dispatch.
    return cpu_median_ms(fn, reps=15, warmup=3)


def check_agreement(name: str, got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Stop unless `got` computes transformers' block: every token within 1e-4 of the output's scale
    in fp32. In bf16 the two route with differently rounded router logits (transformers' in bf16,
    sparsetron's in fp32), so a token whose top-k is a near tie may pick another expert: tokens
    beyond 5e-2 of the scale are counted, and more than 2% of them stops the run."""
    scale = expected.abs().max().item()
    errors_T = (got - expected).abs().flatten(0, -2).amax(-1)
    if dtype != torch.bfloat16:
        if errors_T.max().item() > 1e-4 * scale:
            raise SystemExit(
                f"{name} and Hugging Face disagree: max error {errors_T.max().item():.3g} > {1e-4 * scale:.3g}"
            )
        return
    off = int((errors_T > 5e-2 * scale).sum())
    print(f"{name}: {off} of {errors_T.numel()} tokens beyond 5e-2 of transformers' output (bf16 routing near ties)")
    if off > 0.02 * errors_T.numel():
        raise SystemExit(f"{name} and Hugging Face disagree on {off} of {errors_T.numel()} tokens in bf16 (> 2%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    for name in GPU_SHAPES:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    args = parser.parse_args()
    defaults = GPU_SHAPES if args.device == "cuda" else CPU_SHAPES
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    ]

    torch.manual_seed(0)
    x = torch.randn(1, args.tokens, args.dim, device=args.device, dtype=args.dtype)
    grad = torch.randn_like(x)
    ours = {backend: sparsetron_layer(args, backend) for backend in ("auto", "loop")}
    ours["loop"].load_state_dict(ours["auto"].state_dict())
    hf = hf_block_like(ours["auto"], args)

    with torch.no_grad():
        expected = hf(x).float()
        for backend, layer in ours.items():
            check_agreement(f"sparsetron ({backend})", layer(x).float(), expected, args.dtype)

    candidates = {f"sparsetron ({b})": layer for b, layer in ours.items()} | {"transformers Qwen3MoeSparseMoeBlock": hf}
    fwd_flops = 2 * 3 * args.tokens * args.top_k * args.dim * args.hidden
    timed = {}
    for name, module in candidates.items():
        x_grad = x.detach().requires_grad_()

        def forward(module=module):
            with torch.no_grad():
                module(x)

        def forward_backward(module=module, x_grad=x_grad):
            module(x_grad).backward(grad)

        timed[name] = (forward, forward_backward)
    # Warm every candidate up before timing any, so that none pays the process's first-use costs.
    for forward, forward_backward in timed.values():
        forward()
        forward_backward()
    rows = [(name, bench(fwd, args.device), bench(fb, args.device)) for name, (fwd, fb) in timed.items()]

    hf_fwd, hf_fb = rows[-1][1], rows[-1][2]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(
        f"MoE layer on {device_name}, {str(args.dtype).removeprefix('torch.')}: {args.tokens} tokens, "
        f"d {args.dim}, {args.experts} experts of hidden {args.hidden}, top-{args.top_k}"
    )
    print(
        f"{'implementation':40} {'fwd ms':>9} {'TFLOP/s':>8} {'vs HF':>7} {'fwd+bwd ms':>11} {'TFLOP/s':>8} {'vs HF':>7}"
    )
    for name, fwd, fb in rows:
        print(
            f"{name:40} {fwd:9.2f} {fwd_flops / fwd / 1e9:8.3g} {hf_fwd / fwd:6.2f}x "
            f"{fb:11.2f} {3 * fwd_flops / fb / 1e9:8.3g} {hf_fb / fb:6.2f}x"
        )


if __name__ == "__main__":
    main()
