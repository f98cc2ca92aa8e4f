"""Model FLOPs per token and model FLOPs utilisation (MFU).

The count is the usual "6N + attention" one (PaLM, appendix B):

- every active, non-embedding weight does one multiply-add (2 FLOPs) per token in the
  forward and twice that in the backward: 6 FLOPs per weight per token. Embedding
  lookups are gathers and are not counted; an untied output head is a matmul and the
  caller counts it among the active parameters when it wants it counted. With
  `moe.dispatch_dim` r the two dispatch projections (2 D r per MoE layer) are active weights
  and each routed expert is r wide (3 r H instead of 3 D H): `model.params.active_params`
  counts both, so MFU follows the narrower experts;
- attention scores (Q K^T) and the weighted sum (A V) each cost 2 * seq_len * head_dim
  FLOPs per head per token in the forward, 3x that forward + backward: 12 * n_layers *
  n_heads * head_dim * seq_len. A causal mask leaves half of the score matrix to
  compute, so the count is halved. Block-sparse attention (MoBA) passes, per layer, the mean
  number of keys a query attends (`AttentionConfig.attended_keys`) instead.

Recomputation under activation checkpointing is not counted: MFU measures useful work.
"""

from __future__ import annotations

import torch

from sparsetron.model.config import AttentionConfig, ModelConfig, MoEConfig
from sparsetron.model.params import active_params

__all__ = ["PEAK_BF16_TFLOPS", "flops_per_token", "mfu", "model_flops_per_token", "peak_tflops"]

# Dense (no 2:4 sparsity) bf16 tensor-core peaks from the vendor datasheets, by a
# substring of torch.cuda.get_device_name. Checked in order: specific names first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM and HBM3 variants
    ("H800", 989.0),
    ("H20", 148.0),
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("V100", 125.0),  # fp16: V100 has no bf16
)


def flops_per_token(
    n_active_params: int,
    n_layers: int,
    n_heads: int,
    head_dim: int,
    seq_len: int,
    attended_keys: list[float] | None = None,
) -> float:
    """Training FLOPs (forward + backward) per token; see the module docstring.

    `n_active_params` counts the non-embedding weights one token passes through (for
    MoE: shared experts plus top-k routed experts, not all experts). `attended_keys`: per
    layer, the mean keys a query attends (default: seq_len / 2 each, causal full attention).
    """
    keys = attended_keys if attended_keys is not None else [seq_len / 2.0] * n_layers
    dense = 6.0 * n_active_params
    attention = 12.0 * n_heads * head_dim * sum(keys)
    return dense + attention


def model_flops_per_token(
    model_cfg: ModelConfig, attn_cfg: AttentionConfig, moe_cfg: MoEConfig, seq_len: int, moba: bool = True
) -> float:
    """`flops_per_token` of a model training on sequences of `seq_len`, its multi-token prediction
    depths included; with `moba` False its MoBA layers count full attention (after
    attention.moba_full_after switches them)."""
    return flops_per_token(
        active_params(model_cfg, attn_cfg, moe_cfg),
        model_cfg.n_layers,
        attn_cfg.n_heads,
        attn_cfg.head_size(model_cfg.dim),
        seq_len,
        attn_cfg.attended_keys(model_cfg.n_layers, seq_len, moba=moba, extra_layers=model_cfg.mtp_depth),
    )


def peak_tflops(device: torch.device | str) -> float | None:
    """The accelerator's dense bf16 peak in TFLOP/s, or None on a CPU or an unknown GPU."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return peak_tflops_for_name(name)


def peak_tflops_for_name(name: str) -> float | None:
    for key, peak in PEAK_BF16_TFLOPS:
        if key in name:
            return peak
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1]; all three are per accelerator. None without a known peak."""
    if not peak_tflops:
        return None
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12)
