"""The parallel layout: `ParallelDims` checks it, `ParallelMesh` holds its named device meshes.

Mesh axes, outermost first; a rank's coordinates are its row-major index in this shape:

    pp x dp_replicate x dp_shard x cp x tp        (config: pipeline, data_parallel_replicate,
                                                    data_parallel_shard, context, tensor)

so tensor-parallel ranks are adjacent (rank = ... + tp index), then context, then the data
axes, and pipeline stages are the outermost blocks of ranks. Every axis exists even at
degree 1, so callers can always ask for it.

Expert folding (Megatron's "parallel folding"). Attention and dense layers use
pp x dp_replicate x dp_shard x cp x tp. The routed experts keep pp, dp_replicate and tp,
and re-cut the dp_shard x cp ranks of each (pp, dp_replicate, tp) slice into

    edp_shard x ep,   edp_shard = dp_shard * cp / ep,

with ep the fastest-varying part: number the dp_shard x cp ranks of a slice
j = dp_shard_index * cp + cp_index; then ep_index = j % ep and edp_shard_index = j // ep.
So an expert-parallel group takes context ranks first, then data-shard ranks (the ones
nearest in rank order, i.e. on one node where possible, where the all-to-all is cheapest).
`ep` must divide dp_shard * cp. The expert-data-parallel ranks of an expert are
edp = dp_replicate x edp_shard (dp_replicate * dp_shard * cp / ep of them): expert
gradients are reduced over edp, dense gradients over dp_cp = dp_replicate x dp_shard x cp.
The expert view keeps the tp axis (the same ranks as attention's tp); whether expert
weights are split over it or replicated is for `apply_ep` to decide.

Named meshes, `mesh[name]` for a `ParallelMesh` (each 1-D, its group the ranks that differ
only in the named coordinates):

    pp, dp_replicate, dp_shard, cp, tp   the axes above
    dp            dp_replicate x dp_shard        ranks that read different batches
    dp_shard_cp   dp_shard x cp                  FSDP's shard axis for dense parameters
    dp_cp         dp_replicate x dp_shard x cp   loss averaging, dense gradient reduction
    dp_cp_tp      dp_cp x tp                     ranks of a stage holding different tokens (tp ranks
                                                 do under sequence parallelism): MoE expert counts
    cp_tp         cp x tp                        ranks holding parts of the same sequences: MoE
                                                 per-sequence statistics
    ep            ep                             experts split over, token all-to-all
    edp_shard     dp_shard * cp / ep             FSDP's shard axis for expert parameters
    edp           dp_replicate x edp_shard       expert gradient reduction

and multi-axis meshes: any ascending subset of the five axes (`mesh["dp_shard", "tp"]`),
the dense HSDP mesh `mesh["dp_replicate", "dp_shard_cp"]`, and from the expert view
(dp_replicate, edp_shard, ep) any ascending subset, e.g. the expert HSDP mesh
`mesh["dp_replicate", "edp_shard"]`.

Why a holder and not one DeviceMesh: (dp_shard, cp) and (edp_shard, ep) are two
row-major cuts of the same ranks, and in general neither refines the other (dp_shard 3 x
cp 2 with ep 3: the ep groups {0,1,2}, {3,4,5} cut across the cp groups {0,1}, {2,3},
{4,5}), so no single mesh has both as named axes. torch's DeviceMesh expresses the
expert cut as `_unflatten` of the flattened dp_replicate x dp_shard x cp axis; every view
shares the one root mesh built by `init_device_mesh`, as DTensor and FSDP2 require
when they combine meshes. Flattened axes are kept here rather than sliced from the root
by name, which torch deprecates.

`data_parallel_shard: -1` takes whatever the other degrees leave of the world size.

Process groups exist only inside the meshes `build_mesh` returns; this module keeps no
global state.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from math import prod
from typing import TYPE_CHECKING

from sparsetron.model.config import ConfigError
from sparsetron.parallel.config import ParallelConfig

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh

MESH_AXES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
"""The root mesh's axes, outermost first."""

CONFIG_KEYS = {
    "dp_replicate": "data_parallel_replicate",
    "dp_shard": "data_parallel_shard",
    "cp": "context",
    "tp": "tensor",
    "pp": "pipeline",
    "ep": "expert",
}
"""ParallelDims field -> its key in the `parallel:` config section (errors name the key)."""


@dataclass(frozen=True, kw_only=True)
class ParallelDims:
    """Degrees of each mesh axis for `world_size` ranks; checked on construction.

    Construction runs the layout-only checks (`check`), so a ParallelDims that exists
    multiplies to its world size. `validate` adds the model-dependent ones. Both run
    before any process group exists.
    """

    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    world_size: int = 1

    def __post_init__(self) -> None:
        self.check()

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> ParallelDims:
        """The layout `cfg` asks for on `world_size` ranks (data_parallel_shard -1 = the rest)."""
        dp_shard = cfg.data_parallel_shard
        if dp_shard == -1:
            others = cfg.data_parallel_replicate * cfg.context * cfg.tensor * cfg.pipeline
            if others < 1 or world_size % others != 0:
                raise ConfigError(
                    f"parallel: data_parallel_shard=-1 takes what is left of WORLD_SIZE={world_size}, but "
                    f"data_parallel_replicate {cfg.data_parallel_replicate} x context {cfg.context} x "
                    f"tensor {cfg.tensor} x pipeline {cfg.pipeline} = {others} does not divide it"
                )
            dp_shard = world_size // others
        return cls(
            dp_replicate=cfg.data_parallel_replicate,
            dp_shard=dp_shard,
            cp=cfg.context,
            tp=cfg.tensor,
            pp=cfg.pipeline,
            ep=cfg.expert,
            world_size=world_size,
        )

    def check(self) -> None:
        """Layout-only rules: positive degrees, product = world size, ep divides dp_shard x cp."""
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                key = f"parallel.{CONFIG_KEYS[f.name]}" if f.name in CONFIG_KEYS else "WORLD_SIZE"
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
        ranks = prod(getattr(self, axis) for axis in MESH_AXES)
        if ranks != self.world_size:
            product = " x ".join(f"{CONFIG_KEYS[a]} {getattr(self, a)}" for a in CONFIG_KEYS if a != "ep")
            raise ConfigError(f"parallel: {product} = {ranks} ranks, but WORLD_SIZE is {self.world_size}")
        if (self.dp_shard * self.cp) % self.ep != 0:
            raise ConfigError(
                f"parallel.expert={self.ep} must divide data_parallel_shard x context = {self.dp_shard * self.cp} "
                f"(expert parallelism is folded onto those ranks)"
            )

    def validate(self, n_heads: int, n_kv_heads: int, num_experts: int) -> None:
        """Model-dependent rules. `num_experts` counts routed experts (moe.routed_experts; 0 = dense).

        `n_kv_heads` 0 means n_heads, as in the attention section.
        """
        self.check()
        n_kv_heads = n_kv_heads or n_heads
        if n_heads % self.tp != 0 or n_kv_heads % self.tp != 0:
            raise ConfigError(
                f"parallel.tensor={self.tp} must divide attention.n_heads={n_heads} "
                f"and attention.n_kv_heads={n_kv_heads}"
            )
        if self.ep > 1 and num_experts == 0:
            raise ConfigError(
                f"parallel.expert={self.ep} needs routed experts, but the model is dense (moe.num_experts=0)"
            )
        if num_experts and num_experts % self.ep != 0:
            raise ConfigError(
                f"parallel.expert={self.ep} must divide the {num_experts} routed experts "
                "(moe.num_experts x moe.granularity)"
            )

    @property
    def dp(self) -> int:
        """Data-parallel degree: ranks reading different batches (dp_replicate x dp_shard)."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_shard_cp(self) -> int:
        """Ranks dense parameters are sharded over (dp_shard x cp)."""
        return self.dp_shard * self.cp

    @property
    def dp_cp(self) -> int:
        """Ranks the loss and dense gradients are averaged over (dp_replicate x dp_shard x cp)."""
        return self.dp * self.cp

    @property
    def edp_shard(self) -> int:
        """Ranks expert parameters are sharded over: dp_shard x cp / ep."""
        return self.dp_shard_cp // self.ep

    @property
    def edp(self) -> int:
        """Expert-data-parallel degree: replicas of each expert shard (dp_replicate x dp_shard x cp / ep)."""
        return self.dp_replicate * self.edp_shard

    @property
    def dp_replicate_enabled(self) -> bool:
        return self.dp_replicate > 1

    @property
    def fsdp_enabled(self) -> bool:
        """Parameters sharded over dp_shard x cp (context ranks hold different tokens, so they shard too)."""
        return self.dp_shard_cp > 1

    @property
    def hsdp_enabled(self) -> bool:
        return self.dp_replicate_enabled and self.fsdp_enabled

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    def describe(self) -> str:
        """One line for logs, e.g. 'pp 1 x dp_replicate 1 x dp_shard 4 x cp 1 x tp 1; experts ep 2 x edp 2'."""
        dense = " x ".join(f"{axis} {getattr(self, axis)}" for axis in MESH_AXES)
        return f"{dense}; experts ep {self.ep} x edp {self.edp}"

    def build_mesh(self, device_type: str) -> ParallelMesh:
        """Create every process group of this layout (collective: all ranks call it, in the same order).

        Needs an initialised default process group of `world_size` ranks.
        """
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():
            raise RuntimeError("build_mesh needs torch.distributed.init_process_group to have run")
        if dist.get_world_size() != self.world_size:
            raise ConfigError(
                f"parallel: the layout is for WORLD_SIZE={self.world_size}, "
                f"but the process group has {dist.get_world_size()} ranks"
            )
        root = init_device_mesh(device_type, tuple(getattr(self, a) for a in MESH_AXES), mesh_dim_names=MESH_AXES)
        dp = root["dp_replicate", "dp_shard"]._flatten("dp")
        dp_cp = root["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
        dp_cp_tp = root["dp_replicate", "dp_shard", "cp", "tp"]._flatten("dp_cp_tp")
        cp_tp = root["cp", "tp"]._flatten("cp_tp")
        # The two cuts of dp_cp: dense (replicate x shard over dp_shard x cp) and expert.
        dense_dp = dp_cp._unflatten(0, (self.dp_replicate, self.dp_shard_cp), ("dp_replicate", "dp_shard_cp"))
        expert = dp_cp._unflatten(0, (self.dp_replicate, self.edp_shard, self.ep), ("dp_replicate", "edp_shard", "ep"))
        edp = expert["dp_replicate", "edp_shard"]._flatten("edp")
        flat = {
            "dp": dp,
            "dp_cp": dp_cp,
            "dp_cp_tp": dp_cp_tp,
            "cp_tp": cp_tp,
            "dp_shard_cp": dense_dp["dp_shard_cp"],
            "ep": expert["ep"],
            "edp_shard": expert["edp_shard"],
            "edp": edp,
        }
        return ParallelMesh(self, root, (root, dense_dp, expert), flat)


class ParallelMesh:
    """The named device meshes of one layout, all views of one root mesh (see the module docstring)."""

    def __init__(
        self,
        dims: ParallelDims,
        root: DeviceMesh,
        views: tuple[DeviceMesh, ...],
        flat: dict[str, DeviceMesh],
    ) -> None:
        self.dims = dims
        self.root = root
        """The 5-D mesh (pp, dp_replicate, dp_shard, cp, tp)."""
        self._views = views
        self._flat = flat

    @property
    def names(self) -> tuple[str, ...]:
        """Every 1-D mesh name `mesh[name]` accepts."""
        return (*MESH_AXES, *self._flat)

    def __getitem__(self, names: str | tuple[str, ...]) -> DeviceMesh:
        key = (names,) if isinstance(names, str) else tuple(names)
        if len(key) == 1 and key[0] in self._flat:
            return self._flat[key[0]]
        for view in self._views:
            if set(key) <= set(view.mesh_dim_names or ()):
                return view[key]
        views = ", ".join(str(v.mesh_dim_names) for v in self._views)
        raise KeyError(f"no mesh named {names!r}: 1-D names are {self.names}; multi-axis meshes come from {views}")

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def group(self, name: str) -> ProcessGroup:
        """The process group of the 1-D mesh `name` that holds this rank."""
        return self[name].get_group()

    def __repr__(self) -> str:
        return f"ParallelMesh({self.dims.describe()})"
