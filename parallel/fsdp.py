"""Data parallelism: FSDP2 (`fully_shard`) per transformer block and at the root.

Dense parameters are sharded over mesh["dp_shard_cp"]; with dp_replicate > 1 the mesh is
("dp_replicate", "dp_shard_cp"), HSDP: sharded within a group, replicated across groups,
gradients reduced over both. Gradients are averaged over the dp_cp ranks, which with a
per-rank mean loss over equal token counts gives the gradient of the global mean loss.

Routed experts split by `apply_ep` are their own FSDP unit on the expert cut of the same
ranks: sharded over mesh["edp_shard"] (HSDP over ("dp_replicate", "edp_shard")), and
gradients summed over those edp ranks then divided by dp_cp, not edp: the all-to-all has
already summed the contributions of the ep ranks' tokens into each expert's gradient.

Mixed precision (parallel/precision.py): units gather their parameters in bf16, which is what
every layout computes with (autocast rounds the weights of its products; norms and routers
round theirs with `model.layers.as_computed`), so FSDP changes no number but the reduction order.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from sparsetron.model.moe.balancing import moe_layers
from sparsetron.parallel.dims import ParallelMesh
from sparsetron.parallel.expert_parallel import ExpertParallelExperts
from sparsetron.parallel.precision import FP32, Precision


def apply_fsdp(model: nn.Module, mesh: ParallelMesh, precision: Precision = FP32) -> None:
    """Shard expert-parallel experts, then every block of `model.layers` and every multi-token
    prediction depth, then the rest (embeddings, final norm, head) at the root.

    Inner units first: a block's fully_shard leaves out parameters a nested unit already holds.
    Parameters are all-gathered and computed in the precision policy's compute dtype (bf16
    under mixed precision); the sharded fp32 parameters, the optimizer and the gradient
    reduction stay fp32.
    """
    dims = mesh.dims
    policy = precision.fsdp_policy()
    dense_mesh = mesh["dp_replicate", "dp_shard_cp"] if dims.dp_replicate_enabled else mesh["dp_shard_cp"]
    expert_mesh = mesh["dp_replicate", "edp_shard"] if dims.dp_replicate_enabled else mesh["edp_shard"]
    units = [block for block in model.layers.values() if block is not None]
    mtp = getattr(model, "mtp", None)
    if mtp is not None:
        units += mtp.layers.values()  # each depth: its block with its norms and projection
    for unit in units:
        for layer in moe_layers(unit):
            if isinstance(layer.experts, ExpertParallelExperts):
                _shard_experts(layer.experts, expert_mesh, dims.dp_cp, dims.edp_shard, policy)
        fully_shard(unit, mesh=dense_mesh, mp_policy=policy)
    fully_shard(model, mesh=dense_mesh, mp_policy=policy)


def reduce_across_replicas(model: nn.Module, enabled: bool) -> None:
    """Whether this backward all-reduces gradients across HSDP replicas (dp_replicate).

    With gradient accumulation only the last micro-batch needs to: every backward still
    reduce-scatters within the shard group into the sharded gradient, which sums the
    micro-batches, and the last one's all-reduce carries the sum across replicas (the
    cross-node traffic, once per step instead of once per micro-batch).
    """
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_requires_all_reduce(enabled, recurse=False)


def _shard_experts(
    experts: nn.Module, mesh: DeviceMesh, dp_cp: int, edp_shard: int, policy: MixedPrecisionPolicy
) -> None:
    experts = fully_shard(experts, mesh=mesh, mp_policy=policy)
    experts.set_gradient_divide_factor(dp_cp)
    # A custom factor makes FSDP reduce-scatter with PREMUL_SUM, which gloo lacks; plain SUM
    # and a division afterwards work on every backend. Not with one shard rank: there torch
    # (2.13) skips the reduce-scatter and would divide by the factor twice.
    if edp_shard > 1:
        experts.set_force_sum_reduction_for_comms(True)
