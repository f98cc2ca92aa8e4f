"""The per-rank memory plan a run prints at start.

Parameters, gradients and AdamW states are counted exactly from the parallelized model (still
on the meta device): a parameter that is a DTensor (FSDP, tensor- or expert-parallel shard)
counts its local shard, a plain one counts whole, a pipeline stage counts only the pieces it
holds. Activations are an estimate, per token and layer, of what autograd keeps for the
backward:

    attention  4 D (residual into the norm, fp32) + b (2 D + 2 D_q + 2 D_kv) + S with a dense document mask
    dense FFN  4 D + b (D + 4 H)
    MoE        4 D + b D + 8 E (router logits, scores) + k (b 4 H_e + (b + 4) D) + b 4 H_shared
    head       4 D + b D + 12 V  (fp32 logits, their softmax for the loss)

b is the bytes of the compute dtype (2 under bf16 autocast, else 4), D the width, D_q and
D_kv the query and key/value widths, S the sequence length (the boolean document mask the
reference path builds where flash varlen attention does not run: on CPUs and in fp32),
H the FFN hidden size, E the routed experts, k of them per token with hidden H_e. With full
activation checkpointing a layer keeps only its input (4 D) and one layer's activations
exist at a time during recompute. Only the layers (and the head) this rank holds count.
Tensor parallelism with sequence parallelism splits every layer's activations over the
tensor ranks (the head's logits are whole on each). A pipeline stage may hold the
activations of several micro-batches at once (`in_flight`; the first stage of 1F1B holds
as many as there are stages). tests/unit/test_memory_plan.py holds the estimate to within
a factor of 1.25 of what autograd really saves.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.distributed.tensor import DTensor

from sparsetron.model.config import AttentionConfig, ModelConfig, MoEConfig
from sparsetron.model.transformer import uses_moe
from sparsetron.parallel.dims import ParallelDims

ADAMW_STATES = 2  # exp_avg and exp_avg_sq, fp32 like the parameters
FP32 = 4
GIB = 1 << 30


@dataclass
class MemoryPlan:
    """Bytes one rank holds (the largest shard where shards differ)."""

    parameters: int
    """Number of parameter elements on this rank."""
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    """Estimate for one micro-batch's forward, kept until its backward."""

    @property
    def total_bytes(self) -> int:
        return self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes + self.activation_bytes

    def describe(self) -> str:
        def size(n: int) -> str:
            return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / (1 << 20):.1f} MiB"

        return (
            f"memory per rank: parameters {self.parameters / 1e6:.2f}M = {size(self.parameter_bytes)}, "
            f"gradients {size(self.gradient_bytes)}, AdamW states {size(self.optimizer_bytes)}, "
            f"activations ~{size(self.activation_bytes)} (estimate), total ~{size(self.total_bytes)}"
        )


def layer_activation_bytes(
    model_cfg: ModelConfig,
    attn_cfg: AttentionConfig,
    moe_cfg: MoEConfig,
    seq_len: int,
    compute_bytes: int,
    dense_document_mask: bool = True,
) -> list[int]:
    """Estimated bytes each transformer layer keeps per token for the backward; with
    `dense_document_mask` masked documents cost their [S, S] boolean mask."""
    b, D = compute_bytes, model_cfg.dim
    head_dim = attn_cfg.head_size(D)
    d_q, d_kv = attn_cfg.n_heads * head_dim, attn_cfg.kv_heads() * head_dim
    attention = (
        FP32 * D
        + b * (2 * D + 2 * d_q + 2 * d_kv)
        + (seq_len if attn_cfg.document_masking and dense_document_mask else 0)
    )
    layers = []
    for layer_id in range(model_cfg.n_layers):
        if uses_moe(layer_id, moe_cfg):
            k, hidden = moe_cfg.experts_per_token, moe_cfg.hidden_size(model_cfg)
            shared = moe_cfg.n_shared_experts * hidden
            ffn = FP32 * D + b * D + 2 * FP32 * moe_cfg.routed_experts
            ffn += k * (b * 4 * hidden + (b + FP32) * D) + b * 4 * shared
        else:
            ffn = FP32 * D + b * (D + 4 * model_cfg.ffn_hidden)
        layers.append(attention + ffn)
    return layers


def head_activation_bytes(model_cfg: ModelConfig, compute_bytes: int) -> int:
    """Estimated bytes per token of the final norm, the head and the loss."""
    return FP32 * model_cfg.dim + compute_bytes * model_cfg.dim + 3 * FP32 * model_cfg.vocab_size


def memory_plan(
    model: nn.Module,
    model_cfg: ModelConfig,
    attn_cfg: AttentionConfig,
    moe_cfg: MoEConfig,
    dims: ParallelDims,
    micro_batch_size: int,
    seq_len: int,
    compute_bytes: int,
    activation_checkpointing: bool,
    in_flight: int = 1,
    dense_document_mask: bool = True,
) -> MemoryPlan:
    """The plan for this rank's `model` (parallelized as `dims` says, possibly still on the meta
    device), with `in_flight` micro-batches' activations held at once; `dense_document_mask`
    says whether attention builds a dense mask for packed documents (see the module docstring)."""
    seen: set[int] = set()
    elements = 0
    for param in model.parameters():
        if id(param) not in seen:  # tied weights count once
            seen.add(id(param))
            elements += (param.to_local() if isinstance(param, DTensor) else param).numel()
    per_layer_id = layer_activation_bytes(model_cfg, attn_cfg, moe_cfg, seq_len, compute_bytes, dense_document_mask)
    held = [int(key) for key, block in model.layers.items() if block is not None]
    layers = [per_layer_id[i] // dims.tp for i in held]
    if not layers:
        per_layer = 0
    elif activation_checkpointing:
        # Each layer keeps its input; one layer's activations are rebuilt at a time.
        per_layer = FP32 * model_cfg.dim * len(layers) // dims.tp + max(layers)
    else:
        per_layer = sum(layers)
    per_token = per_layer + (head_activation_bytes(model_cfg, compute_bytes) if model.output is not None else 0)
    return MemoryPlan(
        parameters=elements,
        parameter_bytes=FP32 * elements,
        gradient_bytes=FP32 * elements,
        optimizer_bytes=ADAMW_STATES * FP32 * elements,
        activation_bytes=per_token * micro_batch_size * seq_len * in_flight,
    )
