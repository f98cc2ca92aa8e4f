"""Tensor parallelism with sequence parallelism (Megatron-LM's column/row split), for the plain model.

Shape legend: B batch, S sequence, D model dim, V vocabulary, tp the tensor-parallel degree.

Every rank of a tensor-parallel group reads the same batch. Between the matrix products the
residual stream is split along the sequence (sequence parallelism), so each rank holds a
local [B, S/tp, D] tensor and computes the norms on its own tokens:

    tokens [B, S] (whole) --embedding, vocab rows split, reduce-scatter--> h [B, S/tp, D]
    block:   attention_norm(h) --all-gather--> wq, wk, wv (heads split) -> attention
             -> wo (rows split) --reduce-scatter--> + h
             ffn_norm(h) --all-gather--> w1, w3 (hidden split) -> w2 (rows split) --reduce-scatter--> + h
       or    ffn_norm(h) -> MoE on this rank's own S/tp tokens (no communication) -> + h
             (router_input=pre_attention: the MoE's router reads attention_norm(h), also its local S/tp tokens)
    norm(h) --all-gather--> output (vocab split) --all-gather--> logits [B, S, V] whole on every rank

MoE layers are not split (Megatron's expert-tensor-parallel size 1, "parallel folding"):
each rank routes and computes only its own tokens with whole, replicated router and expert
weights. Those weights, and the per-head q_norm/k_norm weights (which each rank applies to
its own heads only), therefore get only this rank's share of their gradient;
`sum_grads_over_tp` adds the shares once per optimizer step. The MoE layers learn through
`MoE.token_split` that each holds one part of every sequence, so that balancing losses
and expert counts are those of whole sequences.

The embedding's output is waited for in eager mode (`_wait_for_collective`): RowwiseParallel
leaves its reduce-scatter in flight as an AsyncCollectiveTensor, and torch 2.13's AOTAutograd
unwraps such an input of a compiled block without its requires_grad, so the compiled first block
would return no gradient for it and the embedding would silently stop learning
(pytorch/pytorch#191113).

Order: `apply_tp` runs on the meta-device model before activation checkpointing, compile and
FSDP; the model is then materialised (`to_empty`, then `init_weights` under
`parallel.init.SingleProcessInit`, which gives every rank its slice of the one-process init).

Differences from one process: none in exact arithmetic, for dropless MoE. With
moe.capacity_factor > 0 each rank caps experts at a share of its own S/tp tokens, as every
data-parallel rank does with its batch, so dropping differs from one process reading the
whole batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from sparsetron.model.block import Block
from sparsetron.model.config import ConfigError
from sparsetron.model.moe.balancing import TokenSplit
from sparsetron.model.moe.layer import MoE
from sparsetron.model.transformer import Transformer
from sparsetron.parallel.collectives import sum_over

__all__ = ["apply_tp", "check_tp", "sum_grads_over_tp"]


def check_tp(tp: int, seq_len: int) -> None:
    """Refuse a sequence length that `tp` ranks cannot split evenly (cheap; call before building anything).

    Sequence parallelism gives each rank S / tp tokens of every sequence, and the MoE balancing
    losses rebuild per-sequence statistics from equal parts.
    """
    if tp > 1 and seq_len % tp != 0:
        raise ConfigError(
            f"data.seq_len={seq_len} must be divisible by parallel.tensor={tp} "
            "(sequence parallelism splits every sequence evenly over the tensor-parallel ranks)"
        )


def _check_sequence_split(tp: int):
    """A forward pre-hook refusing token batches whose sequence `tp` ranks cannot split evenly.

    DTensor would split an uneven sequence unevenly and run, but the MoE balancing losses
    assume equal parts (balancing.TokenSplit) and would be silently wrong.
    """

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        S = (args[0] if args else kwargs["tokens_BS"]).shape[1]
        if S % tp:
            raise ValueError(f"sequence length {S} is not divisible by parallel.tensor={tp}")

    return hook


class _WaitForCollective(torch.autograd.Function):
    """Identity that finishes an in-flight collective: an AsyncCollectiveTensor in, a plain tensor out."""

    @staticmethod
    def forward(ctx, x: AsyncCollectiveTensor) -> torch.Tensor:
        return x.wait()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def _wait_for_collective(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """A forward hook handing on a plain tensor where `output` is an AsyncCollectiveTensor.

    What follows the embedding (the first block, which may be compiled) needs the reduce-scatter's
    result at once, so waiting here costs no overlap; see the module docstring for why it must.
    """
    return _WaitForCollective.apply(output) if isinstance(output, AsyncCollectiveTensor) else output


class _Colwise(ColwiseParallel):
    """ColwiseParallel that splits only a linear's weight and bias (rows): the rest of a
    model.sigma_reparam linear (gamma, u, v) is then replicated by `distribute_module`, as
    RowwiseParallel leaves it. Stock ColwiseParallel would split every parameter by rows,
    gamma included. DTensor's products then give sigma = u^T W v of the global matrix."""

    def _partition_linear_fn(self, name, module, device_mesh):
        for key in ("weight", "bias"):
            param = getattr(module, key, None)
            if param is not None:
                sharded = distribute_tensor(param, device_mesh, [Shard(0)], src_data_rank=self.src_data_rank)
                module.register_parameter(key, nn.Parameter(sharded, requires_grad=param.requires_grad))


def _block_plan(block: Block) -> dict[str, object]:
    """Parallel styles for one block, keyed by submodule path."""
    plan: dict[str, object] = {
        "attention_norm": SequenceParallel(),
        # The SequenceInfo describes the whole sequences on every rank; only x is gathered.
        # Attention then sees its rank's heads, each computed whole.
        "attention": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
        "attention.wq": _Colwise(),
        "attention.wk": _Colwise(),
        "attention.wv": _Colwise(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
    }
    if isinstance(block.feed_forward, MoE):
        # The MoE sees this rank's tokens as a plain [B, S/tp, D] tensor and returns the same shape,
        # which is what the sequence-parallel residual stream holds: no communication either way.
        # A pre-attention router's input (attention_norm's output) is this rank's same tokens.
        layouts = (Shard(1), Shard(1)) if block.routes_before_attention else (Shard(1),)
        plan["feed_forward"] = PrepareModuleInput(
            input_layouts=layouts, desired_input_layouts=layouts, use_local_output=True
        )
    else:
        plan |= {
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": _Colwise(),
            "feed_forward.w3": _Colwise(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        }
    return plan


def apply_tp(model: Transformer, tp_mesh: DeviceMesh) -> None:
    """Split `model` over the 1-D mesh `tp_mesh` (`ParallelMesh["tp"]`) with sequence parallelism.

    Run on the meta-device model, before activation checkpointing, compile and FSDP. The model's
    forward then takes whole token batches (the same on every rank of the group) and returns
    whole logits [B, S, V] on every rank. Embedding, attention projections, dense FFNs, norms
    and the head become DTensors on `tp_mesh`; MoE layers stay plain and compute this rank's
    tokens (see the module docstring). A tied embedding stays tied: the embedding and the head
    both split the vocabulary rows. After each optimizer step's backward, call
    `sum_grads_over_tp(model, tp_mesh)`.
    """
    tp = tp_mesh.size()
    if tp == 1:
        return
    attn_cfg = model.attn_cfg
    n_heads, n_kv_heads = attn_cfg.n_heads, attn_cfg.kv_heads()
    if n_heads % tp or n_kv_heads % tp:
        raise ConfigError(
            f"parallel.tensor={tp} must divide attention.n_heads={n_heads} and attention.n_kv_heads={n_kv_heads}"
        )
    tied = (
        model.tok_embeddings is not None
        and model.output is not None
        and model.output.weight is model.tok_embeddings.weight
    )
    plan: dict[str, object] = {}
    if model.tok_embeddings is not None:
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        plan["norm"] = SequenceParallel()
    if model.output is not None:
        plan["output"] = _Colwise(input_layouts=Shard(1), output_layouts=Replicate())
    parallelize_module(model, tp_mesh, plan)
    if model.tok_embeddings is not None:
        model.register_forward_pre_hook(_check_sequence_split(tp), with_kwargs=True)
        # Registered after RowwiseParallel's output hook, so it sees the local tensor that hook returns.
        model.tok_embeddings.register_forward_hook(_wait_for_collective)
    if tied:
        # parallelize_module distributed the shared Parameter twice (once per module); both
        # copies are Shard(0) over the vocabulary on tp_mesh, so one can serve both modules.
        model.output.weight = model.tok_embeddings.weight

    token_split = TokenSplit(sum_over(tp_mesh.get_group()), tp)
    # Blocks found by type, so that wrappers (activation checkpointing, compile) would not hide them.
    for block in [m for m in model.modules() if isinstance(m, Block)]:
        parallelize_module(block, tp_mesh, _block_plan(block))
        # The attention module views its projections by head count; each rank now holds a slice.
        block.attention.n_heads = n_heads // tp
        block.attention.n_kv_heads = n_kv_heads // tp
        if isinstance(block.feed_forward, MoE):
            block.feed_forward.token_split = token_split


def _tp_index(mesh: DeviceMesh, tp_mesh: DeviceMesh) -> int | None:
    """Which dimension of `mesh` is the tensor-parallel axis, or None if it has none."""
    if mesh == tp_mesh:
        return 0
    names = mesh.mesh_dim_names or ()
    tp_name = (tp_mesh.mesh_dim_names or (None,))[0]
    return names.index(tp_name) if tp_name is not None and tp_name in names else None


@torch.no_grad()
def sum_grads_over_tp(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Complete the gradients that each tensor-parallel rank holds only a share of: all-reduce SUM.

    Call once per optimizer step, after the last micro-batch's backward (and after FSDP's
    reduction, which the backward finishes), before clipping and the optimizer.

    Why a sum: every rank of the group computes the same loss, on the same batch, with logits
    gathered whole, so nothing is averaged over tp. A parameter that `apply_tp` left
    replicated (router, experts, shared experts and gate, dispatch_dim projections of every MoE
    layer; q_norm and k_norm) was applied by each rank to a disjoint part of the work (its own
    S/tp tokens, its own heads), and the loss depends on it through each part; its true gradient
    is the sum of the parts.
    The same holds for the sequence-parallel norm weights, which DTensor leaves as
    Partial(sum) when no FSDP redistributes them; they become Replicate here.

    Gradients that are DTensors on `tp_mesh` (alone or as one axis of FSDP's 2-D mesh) and not
    Partial on it are already whole and are skipped; plain gradients and FSDP shards over the
    data axes (their local shards) are summed. One all-reduce per gradient dtype.
    """
    if tp_mesh.size() == 1:
        return
    shares: list[torch.Tensor] = []  # local tensors to sum in place
    partials: list[tuple[nn.Parameter, DTensor, int]] = []  # DTensor grads to rebuild as Replicate on tp
    for param in model.parameters():
        grad = param.grad
        if grad is None:
            continue
        if isinstance(grad, DTensor):
            tp_index = _tp_index(grad.device_mesh, tp_mesh)
            if tp_index is not None:
                placement = grad.placements[tp_index]
                if not placement.is_partial():
                    continue
                if placement.reduce_op != "sum":
                    raise RuntimeError(f"gradient with placement {placement} on the tensor-parallel axis")
                partials.append((param, grad, tp_index))
            shares.append(grad.to_local())
        else:
            shares.append(grad)

    group = tp_mesh.get_group()
    by_dtype: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for share in shares:
        by_dtype.setdefault((share.dtype, share.device), []).append(share)
    for tensors in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=group)
        for t, summed in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
            t.copy_(summed.view_as(t))
    for param, grad, tp_index in partials:
        placements = list(grad.placements)
        placements[tp_index] = Replicate()
        param.grad = DTensor.from_local(
            grad.to_local(), grad.device_mesh, placements, run_check=False, shape=grad.shape, stride=grad.stride()
        )
