"""The per-rank memory plan a run prints at start.

Parameters, gradients and AdamW states are counted exactly from the parallelized model (still
on the meta device): a parameter that is a DTensor (FSDP, tensor- or expert-parallel shard)
counts its local shard, a plain one counts whole, a pipeline stage counts only the pieces it
holds. Activations are an estimate of what autograd keeps for the backward, per layer for
the T = B S / cp tokens a rank holds (B rows of S positions, cp context ranks):

    attention  T (8 D + 4 + b D + 8 d  [+ 8 (D_q + D_kv) + 4 (H + K) with qk-norm]) + the op
    dense FFN  T (8 D + 4 + b (D + 4 F))
    MoE        T (8 D + 4 + b D + 8 E + k (2 b H_e + (b + 4) R) + 4 b H_shared  [+ b R (+ b D in 16 bits) with dispatch_dim])
    head       T (8 D + 4 + b D + 4 V),  and 8 T for the embedding's token ids

8 D + 4 is an RMSNorm (its fp32 input and normalized input, 1 / rms), 8 d the rotary cos and
sin of q and k, 4 V the loss's fp32 log-probabilities. Under 16-bit autocast without FSDP the
products also keep autocast's copies of their weights, b per matrix weight element. The attention op, with o = b D_q per
token (its output, which the output projection keeps), without context parallelism:

    SDPA / flash varlen    T (b (D_q + 2 D_kv) + 4 H) + o T       (flash reads shared heads in place)
    dense-mask reference   T (3 b D_q + 4 H) + o T + b B S^2      (documents where flash does not run:
                                                                   k, v repeated to H heads, an [S, S] mask)
    MoBA reference         B (12 D_q S + 5 H S^2) + o T           (fp32 q and repeated k, v; a bool mask
                                                                   and fp32 probabilities [H, S, S] per row)
    MoBA kernels           T (b (D_q + 2 D_kv) + 4 H + 8 H k_1) + o T   (lse, the int32 selection
                                                                   [T, H, k_1] and the gather lists' tokens;
                                                                   int64 arrays per block and tile besides)

b is the bytes of the compute dtype (2 under bf16 autocast, else 4), D the width, d the head
dim, D_q = H d and D_kv = K d the query and key/value widths, F the FFN hidden size, E the
routed experts, k of them per token with hidden H_e and width R (moe.dispatch_dim, else D; the
ascending projection keeps the R-wide combined rows, and under 16-bit autocast the descending one
its own b D cast of the normalized input), H_shared the shared experts' hidden size
(moe.shared_expert_hidden, else n_shared_experts x H_e), k_1 = topk - 1 past blocks (fewer where
a row has fewer blocks). MoBA's reference counts each row as one sequence: packed documents
keep the sum of their squared lengths instead of S^2, so with documents it is an upper bound.

Context parallelism splits every row into 2 cp chunks of C = S / (2 cp); a rank's two chunks
see the keys before U_1 = (r + 1) C and U_2 = (2 cp - r) C, together U = (2 cp + 1) C on every
rank. All-gather (`parallel.context_style`): the queries' terms above hold for the T local
tokens; the keys are the gathered whole rows, 2 b D_kv S per row (with several rows each
chunk copies its U_i keys: 2 b D_kv U). The dense reference repeats them to the query heads
(2 b D_q U per row; without shared heads its SDPA keeps the gathered ones) and builds
[B (1 without documents), 1, C, U_i] masks (b C U); MoBA's reference keeps 4 D_q (L + 2 U) +
5 H C U per row (L = S / cp); the chunks' outputs and their concatenation keep 2 o (MoBA's
reference 1). Ulysses: the op of one process on whole rows with H / cp and K / cp heads, its
quadratic terms whole on every rank (the [B, 1, S, S] mask, MoBA's [H / cp, S, S] per row: they
do not fall with cp), and the all-to-all's copy of the output for the projection (2 o, MoBA's
reference 1).

With full activation checkpointing a layer keeps only its input (4 D) and one layer's
activations exist at a time during recompute. Only the layers (and the head) this rank
holds count. Tensor parallelism with sequence parallelism splits every layer's activations
over the tensor ranks (the head's logits are whole on each). A pipeline stage may hold the
activations of several micro-batches at once (`in_flight`; the first stage of 1F1B holds as
many as there are stages). tests/unit/test_memory_plan.py (one process, each attention path)
and tests/distributed/test_memory_plan_cp.py (a cp rank, both styles) hold the estimate to
within 10% of what autograd really saves, but for MoBA's reference over packed documents.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.distributed.tensor import DTensor

from sparsetron.model.block import uses_moe
from sparsetron.model.config import AttentionConfig, ModelConfig, MoEConfig
from sparsetron.parallel.dims import ParallelDims

ADAMW_STATES = 2  # exp_avg and exp_avg_sq, fp32 like the parameters
FP32 = 4
NORM = 2 * FP32  # RMSNorm keeps its input and the normalized input in fp32 (and 1 / rms)
ROPE = 4 * FP32 // 2  # rotary cos and sin per token, for q and for k, d / 2 each in fp32
TOKEN_ID = 8  # int64
GIB = 1 << 30


def format_bytes(n: int) -> str:
    """A byte count as people read it: GiB from 1 GiB on, MiB below."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / (1 << 20):.1f} MiB"


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
        size = format_bytes
        return (
            f"memory per rank: parameters {self.parameters / 1e6:.2f}M = {size(self.parameter_bytes)}, "
            f"gradients {size(self.gradient_bytes)}, AdamW states {size(self.optimizer_bytes)}, "
            f"activations ~{size(self.activation_bytes)} (estimate), total ~{size(self.total_bytes)}"
        )


@dataclass(frozen=True)
class AttentionPaths:
    """Which implementation this rank's attention ops run: they keep different state."""

    flash: bool = False
    """Full attention over packed documents runs FlashAttention's varlen kernel (CUDA, bf16/fp16)
    rather than the dense-mask reference (`kernels.varlen.flash_varlen_available`)."""
    moba_kernels: bool = False
    """MoBA runs the Triton kernels (CUDA) rather than the dense reference."""
    cp_style: str = "allgather"
    """parallel.context_style, when the context degree is above 1."""


@dataclass(frozen=True)
class _Shard:
    """One rank's share of a micro-batch: B rows of S positions, L = S / cp of them local, in
    query chunks of C positions whose keys end at `ends` (one chunk of all S without cp)."""

    B: int
    S: int
    L: int
    C: int
    ends: tuple[int, ...]

    @property
    def keys(self) -> int:
        """Keys all chunks of a row attend to together, the sum of their ends."""
        return sum(self.ends)

    @property
    def pairs(self) -> int:
        """(query, key) pairs of a row the chunks build masks for."""
        return self.C * self.keys


def _shards(B: int, S: int, cp: int) -> list[_Shard]:
    """Every cp rank's shard: rank r holds chunks r and 2 cp - 1 - r of 2 cp (model.sequence_shard)."""
    if cp == 1:
        return [_Shard(B, S, S, S, (S,))]
    C = S // (2 * cp)
    return [_Shard(B, S, S // cp, C, ((r + 1) * C, (2 * cp - r) * C)) for r in range(cp)]


def _gathered_kv(shard: _Shard, width: int) -> int:
    """Bytes per row of key/value `width` that ops flattening their keys ([B * U, K, d]: flash
    varlen, MoBA's kernels) keep of the whole keys: with several rows each chunk's slice is
    copied (a reshape of a non-contiguous slice; the whole row where the slice is all of it),
    with one row the slices stay views of the gathered tensor."""
    if shard.B == 1:
        return width * shard.S
    return width * shard.keys


def _moba_index_bytes(queries: int, blocks: int, H: int, k1: int, b: int) -> int:
    """The int64 arrays by block or work tile that one call of MoBA's kernels keeps beside the
    per-token ones (kernels.moba.layout): the block layout (7 arrays), each (slot, head, block)
    list's bounds, and each work tile's list and first row (tiles of 64 queries in 16-bit, 32 in fp32)."""
    if not k1:
        return 0
    tile_rows = 64 if b < FP32 else 32
    tiles = -(-queries * H // tile_rows) + H * min(blocks, queries)
    return 8 * (7 * (blocks + 1) + 2 * k1 * H * blocks + 2 * k1 * tiles)


def _op_bytes(
    moba: bool,
    shard: _Shard,
    heads: tuple[int, int, int],
    b: int,
    documents: bool,
    paths: AttentionPaths,
    attn_cfg: AttentionConfig,
) -> int:
    """Bytes one attention op keeps for a shard, its queries local and its keys the whole rows
    (without cp, or Ulysses' whole sequences, the shard is the whole row); the output excluded."""
    H, K, d = heads
    B, L = shard.B, shard.L
    acc = max(b, FP32)  # the references attend in fp32
    lse = FP32 * H * B * L
    if moba and paths.moba_kernels:
        blocks = -(-shard.ends[-1] // attn_cfg.moba_block_size)
        k1 = max(min(attn_cfg.moba_topk - 1, blocks - 1), 0)
        # q, k, v and o, the log-sum-exp, the int32 selection [T, H, topk - 1] and the gather lists' tokens.
        kv = _gathered_kv(shard, 2 * b * K * d) * B
        index = sum(_moba_index_bytes(B * shard.C, B * -(-U // attn_cfg.moba_block_size), H, k1, b) for U in shard.ends)
        return b * H * d * B * L + kv + lse + 2 * 4 * H * k1 * B * L + index
    if moba:
        # Per row: q, and k, v repeated to the query heads, in fp32; a bool mask and fp32
        # probabilities [H, C, U] per chunk (rows as one sequence each: packed documents shorter
        # than the row keep less, the sum of their squares).
        return B * (acc * H * d * (L + 2 * shard.keys) + (1 + acc) * H * shard.pairs)
    if len(shard.ends) == 1 and (not documents or paths.flash):
        # SDPA (flash, or CPU's flash-like kernel) and varlen flash read shared heads in place.
        return b * (H + 2 * K) * d * B * L + lse
    if paths.flash:
        return b * H * d * B * L + _gathered_kv(shard, 2 * b * K * d) * B + lse
    # The dense-mask reference: k, v repeated to the query heads per chunk (SDPA keeps views of
    # the gathered ones themselves without sharing), and a mask in q's dtype, [B, 1, C, U] per
    # chunk ([1, 1, C, U] without documents: causal only).
    kv = 2 * b * H * d * B * shard.keys if H != K else 2 * b * K * d * B * shard.S
    mask = b * (B if documents else 1) * shard.pairs
    return b * H * d * B * L + kv + lse + mask


def attention_op_bytes(
    moba: bool, attn_cfg: AttentionConfig, dim: int, B: int, S: int, cp: int, b: int, paths: AttentionPaths
) -> int:
    """Bytes one layer's attention op (with its output, which the output projection keeps) holds
    for the backward on the cp rank that holds most, for B rows of S positions."""
    head_dim = attn_cfg.head_size(dim)
    H, K = attn_cfg.n_heads, attn_cfg.kv_heads()
    documents = attn_cfg.document_masking
    output = b * H * head_dim * B * (S // cp)
    if cp == 1:
        return _op_bytes(moba, _shards(B, S, 1)[0], (H, K, head_dim), b, documents, paths, attn_cfg) + output
    if paths.cp_style == "ulysses":
        # The unchanged op on whole rows with H / cp heads; the all-to-all back makes the output
        # projection's input a second copy of the output (MoBA's reference keeps none of its own).
        heads = (H // cp, K // cp, head_dim)
        op = _op_bytes(moba, _shards(B, S, 1)[0], heads, b, documents, paths, attn_cfg)
        return op + output * (1 if moba and not paths.moba_kernels else 2)
    # Local queries chunk by chunk: the chunks' outputs and their concatenation for the projection.
    copies = 1 if moba and not paths.moba_kernels else 2
    return max(_op_bytes(moba, s, (H, K, head_dim), b, documents, paths, attn_cfg) for s in _shards(B, S, cp)) + (
        copies * output
    )


def layer_activation_bytes(
    model_cfg: ModelConfig,
    attn_cfg: AttentionConfig,
    moe_cfg: MoEConfig,
    batch: int,
    seq_len: int,
    compute_bytes: int,
    cp: int = 1,
    paths: AttentionPaths = AttentionPaths(),
) -> list[int]:
    """Estimated bytes each transformer layer keeps for the backward of `batch` rows of `seq_len`
    positions, on the context-parallel rank (of `cp`) that keeps most (see the module docstring);
    then the blocks of the multi-token prediction depths (layer ids n_layers and up)."""
    b, D = compute_bytes, model_cfg.dim
    tokens = batch * seq_len // cp
    head_dim = attn_cfg.head_size(D)
    d_q, d_kv = attn_cfg.n_heads * head_dim, attn_cfg.kv_heads() * head_dim
    attention = NORM * D + FP32 + b * D + ROPE * head_dim
    if attn_cfg.qk_norm:
        attention += NORM * (d_q + d_kv) + FP32 * (attn_cfg.n_heads + attn_cfg.kv_heads())
    ops = {moba: attention_op_bytes(moba, attn_cfg, D, batch, seq_len, cp, b, paths) for moba in (False, True)}
    layers = []
    for layer_id in range(model_cfg.n_layers + model_cfg.mtp_depth):
        if uses_moe(layer_id, moe_cfg):
            k, hidden, R = moe_cfg.experts_per_token, moe_cfg.hidden_size(model_cfg), moe_cfg.expert_dim(model_cfg)
            shared = moe_cfg.shared_hidden_size(model_cfg)
            ffn = NORM * D + FP32 + b * D + 2 * FP32 * moe_cfg.routed_experts
            # Per assignment, grouped_swiglu keeps its rows, x w13 and the routing weight (nothing else).
            ffn += k * (b * R + b * 2 * hidden + FP32) + b * 4 * shared
            if moe_cfg.dispatch_dim:
                # The ascending projection keeps the combined rows; under 16-bit autocast the
                # descending one keeps its own cast of the fp32 normalized input.
                ffn += b * R + (b * D if b < FP32 else 0)
        else:
            ffn = NORM * D + FP32 + b * (D + 4 * model_cfg.ffn_hidden)
        op = ops[attn_cfg.backend == "moba" and attn_cfg.uses_moba(layer_id, model_cfg.n_layers)]
        layers.append((attention + ffn) * tokens + op)
    return layers


def head_activation_bytes(model_cfg: ModelConfig, compute_bytes: int) -> int:
    """Estimated bytes per token of the final norm, the head and the loss."""
    return NORM * model_cfg.dim + FP32 + compute_bytes * model_cfg.dim + FP32 * model_cfg.vocab_size


def mtp_activation_bytes(model_cfg: ModelConfig, compute_bytes: int) -> int:
    """Estimated bytes per token of one multi-token prediction depth besides its block: the two
    norms, the projection's 2D-wide input, and its pass through the head and the loss."""
    D = model_cfg.dim
    return 2 * (NORM * D + FP32) + compute_bytes * 2 * D + head_activation_bytes(model_cfg, compute_bytes)


def _local_matrix_elements(module: nn.Module | None) -> int:
    """Elements of the matrix weights (linear layers, stacked experts) `module` holds on this rank."""
    if module is None:
        return 0
    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in module.parameters() if p.dim() >= 2)


def autocast_weight_bytes(
    model: nn.Module, dims: ParallelDims, compute_bytes: int, activation_checkpointing: bool
) -> int:
    """Autocast's 16-bit copies of the matrix weights, which their products keep for the backward.
    None in fp32, and none under FSDP (dp x cp > 1): its blocks' weights arrive in 16 bits and
    are gathered again for the backward. Activation checkpointing rebuilds one block's at a time."""
    if compute_bytes >= FP32 or dims.dp_cp > 1:
        return 0
    blocks = [_local_matrix_elements(block) for block in model.layers.values() if block is not None]
    mtp = getattr(model, "mtp", None)
    if mtp is not None:
        blocks += [_local_matrix_elements(layer) for layer in mtp.layers.values()]
    held = (max(blocks, default=0) if activation_checkpointing else sum(blocks)) + _local_matrix_elements(model.output)
    return compute_bytes * held


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
    paths: AttentionPaths = AttentionPaths(),
) -> MemoryPlan:
    """The plan for this rank's `model` (parallelized as `dims` says, possibly still on the meta
    device), with `in_flight` micro-batches' activations held at once; `paths` says which
    attention implementations run (see the module docstring)."""
    if paths.cp_style not in ("allgather", "ulysses"):
        raise ValueError(f"cp_style must be allgather or ulysses, got {paths.cp_style!r}")
    seen: set[int] = set()
    elements = 0
    for param in model.parameters():
        if id(param) not in seen:  # tied weights count once
            seen.add(id(param))
            elements += (param.to_local() if isinstance(param, DTensor) else param).numel()
    tokens = micro_batch_size * seq_len // dims.cp
    per_layer_id = layer_activation_bytes(
        model_cfg, attn_cfg, moe_cfg, micro_batch_size, seq_len, compute_bytes, dims.cp, paths
    )
    held = [int(key) for key, block in model.layers.items() if block is not None]
    depths = model_cfg.mtp_depth if getattr(model, "mtp", None) is not None else 0
    held += range(model_cfg.n_layers, model_cfg.n_layers + depths)
    layers = [per_layer_id[i] // dims.tp for i in held]
    if not layers:
        per_batch = 0
    elif activation_checkpointing:
        # Each layer keeps its input; one layer's activations are rebuilt at a time.
        per_batch = FP32 * model_cfg.dim * tokens * len(layers) // dims.tp + max(layers)
    else:
        per_batch = sum(layers)
    if model.output is not None:
        per_batch += head_activation_bytes(model_cfg, compute_bytes) * tokens
    per_batch += depths * mtp_activation_bytes(model_cfg, compute_bytes) * tokens
    if model.tok_embeddings is not None:
        # The embedding keeps its token ids, and those of the multi-token prediction inputs.
        per_batch += TOKEN_ID * tokens * (1 + model_cfg.mtp_depth)
    per_batch += autocast_weight_bytes(model, dims, compute_bytes, activation_checkpointing)
    return MemoryPlan(
        parameters=elements,
        parameter_bytes=FP32 * elements,
        gradient_bytes=FP32 * elements,
        optimizer_bytes=ADAMW_STATES * FP32 * elements,
        activation_bytes=per_batch * in_flight,
    )
