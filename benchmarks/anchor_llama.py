"""The plain-PyTorch anchor of ../shared/specs/anchors.md: a Llama-style model in one file.

Per-block `torch.compile`, bf16 autocast, fused AdamW, random tokens; dense SwiGLU or a
fine-grained MoE (fp32 softmax router, top-k, sort permute, `grouped_mm` on Hopper, weighted
combine). Times `--steps` optimizer steps after `--warmup` untimed ones and prints one JSON line:
tokens/s, MFU by the anchors' formula, peak memory, and the active non-embedding parameters
the MFU counted. `benchmarks/end_to_end.py` runs it beside sparsetron's trainer.

    python benchmarks/anchor_llama.py                              # dense, the anchors' shapes
    python benchmarks/anchor_llama.py --experts 32 --top-k 4 --expert-hidden 704
    python benchmarks/anchor_llama.py --device cpu --dim 64 --layers 2 --ffn 128 --heads 4 --seq 64 --vocab 320

Shape legend: B batch, S sequence, D width, H heads, d head dim, F FFN hidden, E experts,
k experts per token, N = B * S tokens, V vocabulary.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from sparsetron.train.flops import flops_per_token, peak_tflops

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def rope(x_BSHd: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    S, d = x_BSHd.shape[1], x_BSHd.shape[-1]
    freqs = torch.outer(
        torch.arange(S, device=x_BSHd.device), theta ** -(torch.arange(0, d, 2, device=x_BSHd.device) / d)
    )
    cos, sin = freqs.cos()[:, None], freqs.sin()[:, None]
    x1, x2 = x_BSHd.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2).type_as(x_BSHd)


class MoE(nn.Module):
    def __init__(self, D: int, E: int, k: int, hidden: int):
        super().__init__()
        self.k, self.router = k, nn.Linear(D, E, bias=False)
        self.w13 = nn.Parameter(torch.randn(E, D, 2 * hidden) * 0.02)
        self.w2 = nn.Parameter(torch.randn(E, hidden, D) * 0.02)

    def experts(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        w13, w2 = self.w13, self.w2
        if _GROUPED_MM is not None and x_ND.is_cuda and torch.cuda.get_device_capability() >= (9, 0):
            offs = counts_E.cumsum(0).to(torch.int32)
            x_ND, w13, w2 = x_ND.bfloat16(), w13.bfloat16(), w2.bfloat16()
            h1, h3 = _GROUPED_MM(x_ND, w13, offs=offs).chunk(2, -1)
            return _GROUPED_MM(F.silu(h1) * h3, w2, offs=offs)
        # Elsewhere one matmul per expert (the sizes reach the host: not for timing).
        outs, start = [], 0
        for e, n in enumerate(counts_E.tolist()):
            h1, h3 = (x_ND[start : start + n] @ w13[e].to(x_ND.dtype)).chunk(2, -1)
            outs.append((F.silu(h1) * h3) @ w2[e].to(x_ND.dtype))
            start += n
        return torch.cat(outs)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        w = self.router.weight
        with torch.autocast(x_ND.device.type, enabled=False):  # the router runs in fp32, as anchors.md's
            probs_NE = F.linear(x_ND.type_as(w), w).softmax(-1)
        weights_Nk, experts_Nk = probs_NE.topk(self.k, -1)
        order = experts_Nk.flatten().argsort()
        counts_E = torch.zeros(probs_NE.shape[1], dtype=torch.int64, device=x_ND.device)
        counts_E.scatter_add_(0, experts_Nk.flatten(), torch.ones_like(order))
        token = order // self.k
        y = self.experts(x_ND[token], counts_E) * weights_Nk.flatten()[order, None]
        return torch.zeros_like(x_ND).index_add_(0, token, y.to(x_ND.dtype))


class Block(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.H, D = a.heads, a.dim
        self.norm1, self.norm2 = nn.RMSNorm(D), nn.RMSNorm(D)
        self.wqkv, self.wo = nn.Linear(D, 3 * D, bias=False), nn.Linear(D, D, bias=False)
        if a.experts:
            self.ffn = MoE(D, a.experts, a.top_k, a.expert_hidden)
        else:
            self.w13, self.w2 = nn.Linear(D, 2 * a.ffn, bias=False), nn.Linear(a.ffn, D, bias=False)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.wqkv(self.norm1(x_BSD)).view(B, S, 3, self.H, D // self.H).unbind(2)
        o = F.scaled_dot_product_attention(
            rope(q).transpose(1, 2), rope(k).transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x_BSD = x_BSD + self.wo(o.transpose(1, 2).reshape(B, S, D))
        h = self.norm2(x_BSD)
        if hasattr(self, "ffn"):
            return x_BSD + self.ffn(h.flatten(0, 1)).view(B, S, D)
        h1, h3 = self.w13(h).chunk(2, -1)
        return x_BSD + self.w2(F.silu(h1) * h3)


class Llama(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.embed = nn.Embedding(a.vocab, a.dim)
        self.blocks = nn.ModuleList(Block(a) for _ in range(a.layers))
        self.norm, self.head = nn.RMSNorm(a.dim), nn.Linear(a.dim, a.vocab, bias=False)

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens_BS)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def active_params(self) -> int:
        """Non-embedding weights one token multiplies with: experts count k / E of theirs."""
        total = sum(p.numel() for n, p in self.named_parameters() if not n.startswith("embed."))
        for block in self.blocks:
            if hasattr(block, "ffn"):
                experts = block.ffn.w13.numel() + block.ffn.w2.numel()
                total -= experts - experts * block.ffn.k // block.ffn.w13.shape[0]
        return total


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for name, default in [("dim", 2048), ("layers", 16), ("heads", 16), ("ffn", 5632), ("vocab", 32000),
                          ("seq", 4096), ("batch", 2), ("experts", 0), ("top_k", 4), ("expert_hidden", 704),
                          ("warmup", 10), ("steps", 10)]:  # fmt: skip
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    p.add_argument("--no-compile", action="store_true", help="eager (the CPU default: no compiler needed)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse(argv)
    torch.manual_seed(0)
    model = Llama(a).to(a.device)
    if a.device == "cuda" and not a.no_compile:
        for block in model.blocks:
            block.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=a.device == "cuda")
    batches = [torch.randint(a.vocab, (a.batch, a.seq + 1), device=a.device) for _ in range(4)]

    def step(i: int) -> None:
        tokens = batches[i % len(batches)]
        with torch.autocast(a.device, torch.bfloat16, enabled=a.device == "cuda"):
            logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(a.warmup):
        step(i)
    sync = torch.cuda.synchronize if a.device == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    for i in range(a.steps):
        step(i)
    sync()
    tokens_per_s = a.steps * a.batch * a.seq / (time.perf_counter() - start)
    active = model.active_params()
    peak = peak_tflops(a.device)
    flops = flops_per_token(active, a.layers, a.heads, a.dim // a.heads, a.seq)
    result = {
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * flops / (peak * 1e12) if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if a.device == "cuda" else None,
        "active_params": active,
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
