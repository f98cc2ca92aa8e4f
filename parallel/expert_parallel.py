"""Expert parallelism: routed experts split over the ep ranks, tokens exchanged by all-to-all.

Shape legend: E routed experts (all ranks), P ep ranks, L = E / P experts on this rank.

The ep ranks are data/context ranks (experts fold onto them, see parallel/dims.py), so each
holds different tokens. ep rank p holds experts [p * L, (p + 1) * L): Shard(0) of the stacked
weights on mesh["ep"]. The dispatchers that move the tokens live in all_to_all_dispatch.py
(each exchange waited for at once) and overlapped_dispatch.py (exchanges in flight while
experts compute).

Gradients: the all-to-all's backward sends each row's gradient back to its source, so an
expert's weight gradient sums the contributions of every ep rank's tokens. With each rank's
loss a mean over its own tokens, the global gradient is that sum, summed over the expert's
replicas (edp) and divided by the dp_cp degree: `parallel.fsdp.apply_fsdp` sets this up.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import Shard, distribute_tensor

from sparsetron.model.moe.balancing import moe_layers
from sparsetron.model.moe.experts import GroupedExperts
from sparsetron.parallel.all_to_all_dispatch import AllToAllDispatcher
from sparsetron.parallel.dims import ParallelMesh
from sparsetron.parallel.exchange import Exchange
from sparsetron.parallel.overlapped_dispatch import OverlappedDispatcher


class ExpertParallelExperts(GroupedExperts):
    """GroupedExperts whose w13 [E, D, 2H] and w2 [E, H, D] are DTensors, Shard(0) over ep.

    The parameters (and model.sigma_reparam's buffers) keep their global shape (checkpoints hold all E experts, and load at any
    ep degree); forward computes with this rank's L experts, for rows grouped by local
    expert (tokens_per_expert_L from `AllToAllDispatcher`). `apply_ep` turns a
    GroupedExperts into one in place, so parameter names and the state dict do not change.
    """

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        # to_local is differentiable: the gradient comes back as a DTensor with the same placements.
        return tensor.to_local()


def apply_ep(model: nn.Module, mesh: ParallelMesh) -> None:
    """Split every MoE layer's routed experts over mesh["ep"] and install the dispatcher its
    moe.dispatcher names at this ep degree: all_to_all, or overlapped with moe.overlap_chunks
    chunks (`MoEConfig.dispatcher_for` refuses local). Every layer's exchanges go through one
    `Exchange` on the ep group (on CUDA: one side stream, so they keep their order).

    Works on the meta device (call before `to_empty` and `init_weights` under
    `SingleProcessInit`) and before `apply_fsdp`, which then shards the experts over
    edp_shard. Routers, shared experts and the dispatch_dim projections stay replicated: they are
    dense parameters.

    With tensor parallelism, the ep groups lie within one tensor-parallel index (mesh["ep"]
    keeps tp fixed) and experts are replicated over tp, not split (expert-tensor-parallel
    size 1, as `parallel.tensor_parallel` leaves MoE layers): each tp rank exchanges its own
    S/tp tokens with its ep group, and `sum_grads_over_tp` adds the tp ranks' shares of the
    expert gradients like those of every other MoE weight.
    """
    ep_mesh = mesh["ep"]
    exchange = Exchange(ep_mesh.get_group())
    for layer in moe_layers(model):
        cfg = layer.moe_cfg
        # Refuses local by name.
        kind = cfg.dispatcher_for(ep_mesh.size())
        experts = layer.experts
        if type(experts) is not GroupedExperts:
            raise TypeError(
                f"apply_ep expects plain GroupedExperts, got {type(experts).__name__} "
                "(apply_ep runs once, before apply_fsdp)"
            )
        if kind == "overlapped":
            layer.dispatcher = OverlappedDispatcher(
                layer.num_experts, exchange, cfg.overlap_chunks, cfg.capacity_factor, cfg.drop_policy
            )
        else:
            layer.dispatcher = AllToAllDispatcher(layer.num_experts, exchange, cfg.capacity_factor, cfg.drop_policy)
        # Every parameter and buffer is experts-first: the weights, and model.sigma_reparam's gammas, u and v.
        for name, weight in list(experts.named_parameters(recurse=False)):
            sharded = distribute_tensor(weight.detach(), ep_mesh, [Shard(0)])
            setattr(experts, name, nn.Parameter(sharded, requires_grad=weight.requires_grad))
        for name, buffer in list(experts.named_buffers(recurse=False)):
            experts.register_buffer(name, distribute_tensor(buffer, ep_mesh, [Shard(0)]))
        # A class change, not a new module: parameters, hooks and names stay where they are.
        experts.__class__ = ExpertParallelExperts
