"""Every named mesh of a layout holds exactly the ranks the layout says, and its group talks.

Expected groups are derived here from the documented rule alone (rank = row-major index
over pp x dp_replicate x dp_shard x cp x tp; experts cut the dp_shard x cp index j into
edp_shard = j // ep, ep = j % ep), not from sparsetron's code. Several layouts share one
spawn, since starting processes dominates the time.
"""

import itertools
import os
import warnings

import pytest
import torch
import torch.distributed as dist
from harness import free_port, run_distributed

from sparsetron.model.config import ConfigError
from sparsetron.parallel.dims import ParallelDims

DENSE_VIEW = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
EXPERT_VIEW = ("pp", "dp_replicate", "edp_shard", "ep", "tp")

# name -> (the view it lives in, the coordinates that vary inside one of its groups)
NAMED = {
    "pp": (DENSE_VIEW, ("pp",)),
    "dp_replicate": (DENSE_VIEW, ("dp_replicate",)),
    "dp_shard": (DENSE_VIEW, ("dp_shard",)),
    "cp": (DENSE_VIEW, ("cp",)),
    "tp": (DENSE_VIEW, ("tp",)),
    "dp": (DENSE_VIEW, ("dp_replicate", "dp_shard")),
    "dp_shard_cp": (DENSE_VIEW, ("dp_shard", "cp")),
    "dp_cp": (DENSE_VIEW, ("dp_replicate", "dp_shard", "cp")),
    "dp_cp_tp": (DENSE_VIEW, ("dp_replicate", "dp_shard", "cp", "tp")),
    "cp_tp": (DENSE_VIEW, ("cp", "tp")),
    "ep": (EXPERT_VIEW, ("ep",)),
    "edp_shard": (EXPERT_VIEW, ("edp_shard",)),
    "edp": (EXPERT_VIEW, ("dp_replicate", "edp_shard")),
}
# multi-axis meshes: (names, view, the coordinate along each mesh dimension)
MULTI = [
    (("dp_replicate", "dp_shard_cp"), DENSE_VIEW, (("dp_replicate",), ("dp_shard", "cp"))),
    (("dp_replicate", "edp_shard"), EXPERT_VIEW, (("dp_replicate",), ("edp_shard",))),
    (("dp_replicate", "edp_shard", "ep"), EXPERT_VIEW, (("dp_replicate",), ("edp_shard",), ("ep",))),
    (("dp_shard", "tp"), DENSE_VIEW, (("dp_shard",), ("tp",))),
]

WORLD_2 = [
    {"dp_shard": 2},
    {"dp_shard": 2, "ep": 2},
    {"dp_replicate": 2},
    {"tp": 2},
    {"pp": 2},
    {"cp": 2, "ep": 2},
]
WORLD_4 = [
    {"dp_replicate": 2, "dp_shard": 2},
    {"dp_replicate": 2, "dp_shard": 2, "ep": 2},
    {"tp": 2, "dp_shard": 2, "ep": 2},
    {"pp": 2, "dp_shard": 2, "ep": 2},
    {"dp_shard": 4, "ep": 2},
    {"dp_shard": 4, "ep": 4},
    {"dp_shard": 2, "cp": 2, "ep": 4},
    {"dp_shard": 2, "cp": 2, "ep": 2},
    {"dp_replicate": 2, "cp": 2, "ep": 2},
    {"pp": 2, "tp": 2},
]
# ep 3 cuts across the cp pairs {0,1} {2,3} {4,5}: the case one mesh cannot name.
WORLD_6 = [{"dp_shard": 3, "cp": 2, "ep": 3}]


def coordinates(layout: dict) -> list[dict]:
    """Each rank's coordinates in both views; list index = rank (row-major enumeration)."""
    size = {axis: layout.get(axis, 1) for axis in DENSE_VIEW}
    ep = layout.get("ep", 1)
    coords = []
    for pp, dr, ds, cp, tp in itertools.product(*(range(size[a]) for a in DENSE_VIEW)):
        j = ds * size["cp"] + cp
        coords.append(
            {"pp": pp, "dp_replicate": dr, "dp_shard": ds, "cp": cp, "tp": tp, "ep": j % ep, "edp_shard": j // ep}
        )
    return coords


def expected_group(coords: list[dict], rank: int, view: tuple, varying: tuple) -> list[int]:
    fixed = [axis for axis in view if axis not in varying]
    return [q for q, c in enumerate(coords) if all(c[a] == coords[rank][a] for a in fixed)]


def expected_grid(coords: list[dict], rank: int, view: tuple, dims: tuple) -> list:
    """Nested rank lists of a multi-axis mesh: split the group along its first dimension, recursively."""
    group = expected_group(coords, rank, view, tuple(a for d in dims for a in d))

    def split(ranks, dims):
        if len(dims) == 1:
            return ranks
        key = lambda q: tuple(coords[q][a] for a in dims[0])  # noqa: E731
        outer = sorted({key(q) for q in ranks})
        return [split([q for q in ranks if key(q) == k], dims[1:]) for k in outer]

    return split(group, dims)


def check_layouts(world_size: int, layouts: list[dict]) -> int:
    """Worker: build each layout's mesh and compare every named mesh with the expectation."""
    rank = dist.get_rank()
    checked = 0
    # Slicing a flattened axis from the root mesh warns in torch 2.13 (deprecated): build_mesh must not.
    warnings.simplefilter("error")
    for layout in layouts:
        dims = ParallelDims(world_size=world_size, **layout)
        mesh = dims.build_mesh("cpu")
        coords = coordinates(layout)
        assert mesh.root.mesh_dim_names == DENSE_VIEW
        assert tuple(mesh.root.shape) == tuple(layout.get(a, 1) for a in DENSE_VIEW)
        for name, (view, varying) in NAMED.items():
            want = expected_group(coords, rank, view, varying)
            sub = mesh[name]
            where = f"layout {layout}, mesh {name!r}, rank {rank}"
            assert sub._get_root_mesh() is mesh.root, (
                f"{where}: not a view of the root mesh (DTensor/FSDP need one root)"
            )
            got = sub.mesh.tolist()
            assert got == want, f"{where}: mesh {got}, expected {want}"
            got = dist.get_process_group_ranks(mesh.group(name))
            assert got == want, f"{where}: process group {got}, expected {want}"
            assert sub.get_local_rank() == want.index(rank), where
            total = torch.tensor([rank])
            dist.all_reduce(total, group=mesh.group(name))
            assert total.item() == sum(want), f"{where}: all_reduce gave {total.item()}, expected {sum(want)}"
            checked += 1
        for names, view, dims_of in MULTI:
            want = expected_grid(coords, rank, view, dims_of)
            got = mesh[names].mesh.tolist()
            assert got == want, f"layout {layout}, mesh {names}, rank {rank}: {got}, expected {want}"
            checked += 1
        assert (mesh["dp"].size(), mesh["edp"].size(), mesh["edp_shard"].size()) == (dims.dp, dims.edp, dims.edp_shard)
    return checked


@pytest.mark.parametrize(
    "world_size,layouts", [(2, WORLD_2), (4, WORLD_4), (6, WORLD_6)], ids=["world2", "world4", "world6"]
)
def test_named_meshes(world_size, layouts):
    checked = run_distributed(check_layouts, world_size, world_size, layouts, timeout=120)
    assert checked == [len(layouts) * (len(NAMED) + len(MULTI))] * world_size


def test_world_of_one_and_mismatch(tmp_path):
    """In this process: every name exists at degree 1; a layout for another world size is refused."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        mesh = ParallelDims().build_mesh("cpu")
        for name in NAMED:
            assert mesh[name].size() == 1 and mesh[name].mesh.tolist() == [0]
        assert set(mesh.names) == set(NAMED)
        with pytest.raises(KeyError, match="no mesh named 'tp_cp'"):
            mesh["tp_cp"]
        with pytest.raises(ConfigError, match="the layout is for WORLD_SIZE=2, but the process group has 1 ranks"):
            ParallelDims(dp_shard=2, world_size=2).build_mesh("cpu")
    finally:
        dist.destroy_process_group()
