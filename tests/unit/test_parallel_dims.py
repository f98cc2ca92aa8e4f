"""ParallelDims: layouts are checked before any process group exists, with errors that name the numbers."""

import re

import pytest

from sparsetron.model.config import ConfigError
from sparsetron.parallel.config import ParallelConfig
from sparsetron.parallel.dims import ParallelDims


def raises(message: str):
    return pytest.raises(ConfigError, match=re.escape(message))


def test_layout_must_multiply_to_world_size():
    with raises(
        "parallel: data_parallel_replicate 1 x data_parallel_shard 2 x context 1 x tensor 2 x pipeline 1 "
        "= 4 ranks, but WORLD_SIZE is 2"
    ):
        ParallelDims(dp_shard=2, tp=2, world_size=2)
    with raises("= 1 ranks, but WORLD_SIZE is 8"):
        ParallelDims.from_config(ParallelConfig(), world_size=8)


@pytest.mark.parametrize("field,key", [("tp", "tensor"), ("dp_shard", "data_parallel_shard"), ("ep", "expert")])
def test_degrees_must_be_positive(field, key):
    with raises(f"parallel.{key} must be a positive integer, got 0"):
        ParallelDims(**{field: 0})


def test_world_size_must_be_positive():
    with raises("WORLD_SIZE must be a positive integer, got 0"):
        ParallelDims(world_size=0)


def test_expert_degree_must_divide_dp_shard_times_cp():
    with raises("parallel.expert=4 must divide data_parallel_shard x context = 2"):
        ParallelDims(dp_shard=2, ep=4, world_size=2)
    with raises("parallel.expert=3 must divide data_parallel_shard x context = 4"):
        ParallelDims(dp_shard=2, cp=2, ep=3, world_size=4)
    # ep may not borrow tensor or replicate ranks
    with raises("parallel.expert=2 must divide data_parallel_shard x context = 1"):
        ParallelDims(tp=2, ep=2, world_size=2)
    with raises("parallel.expert=2 must divide data_parallel_shard x context = 1"):
        ParallelDims(dp_replicate=2, ep=2, world_size=2)


def test_tensor_degree_must_divide_heads():
    dims = ParallelDims(tp=3, world_size=3)
    with raises("parallel.tensor=3 must divide attention.n_heads=8 and attention.n_kv_heads=2"):
        dims.validate(n_heads=8, n_kv_heads=2, num_experts=0)
    dims = ParallelDims(tp=4, world_size=4)
    with raises("parallel.tensor=4 must divide attention.n_heads=8 and attention.n_kv_heads=2"):
        dims.validate(n_heads=8, n_kv_heads=2, num_experts=0)
    dims.validate(n_heads=8, n_kv_heads=4, num_experts=0)
    dims.validate(n_heads=8, n_kv_heads=0, num_experts=0)  # 0 = n_heads, as in the attention section
    with raises("attention.n_heads=6 and attention.n_kv_heads=6"):
        dims.validate(n_heads=6, n_kv_heads=0, num_experts=0)


def test_expert_degree_must_divide_experts():
    dims = ParallelDims(dp_shard=3, ep=3, world_size=3)
    with raises("parallel.expert=3 must divide the 16 routed experts"):
        dims.validate(n_heads=4, n_kv_heads=4, num_experts=16)
    dims.validate(n_heads=4, n_kv_heads=4, num_experts=24)
    with raises("parallel.expert=3 needs routed experts, but the model is dense (moe.num_experts=0)"):
        dims.validate(n_heads=4, n_kv_heads=4, num_experts=0)
    ParallelDims(dp_shard=3, world_size=3).validate(n_heads=4, n_kv_heads=4, num_experts=0)


def test_validate_repeats_the_layout_checks():
    dims = ParallelDims(dp_shard=2, world_size=2)
    object.__setattr__(dims, "world_size", 4)  # what a frozen dataclass can still suffer
    with raises("= 2 ranks, but WORLD_SIZE is 4"):
        dims.validate(n_heads=4, n_kv_heads=4, num_experts=0)


def test_from_config_maps_every_key():
    cfg = ParallelConfig(data_parallel_replicate=2, data_parallel_shard=3, context=2, tensor=2, pipeline=2, expert=6)
    dims = ParallelDims.from_config(cfg, world_size=48)
    assert (dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp, dims.pp, dims.ep) == (2, 3, 2, 2, 2, 6)
    assert dims.world_size == 48


def test_dp_shard_minus_one_takes_the_rest():
    cfg = ParallelConfig(data_parallel_shard=-1, tensor=2, pipeline=2)
    assert ParallelDims.from_config(cfg, world_size=16).dp_shard == 4
    assert ParallelDims.from_config(cfg, world_size=4).dp_shard == 1
    with raises(
        "parallel: data_parallel_shard=-1 takes what is left of WORLD_SIZE=6, but data_parallel_replicate 1 x "
        "context 1 x tensor 2 x pipeline 2 = 4 does not divide it"
    ):
        ParallelDims.from_config(cfg, world_size=6)


@pytest.mark.parametrize(
    "layout,dp,dp_cp,edp_shard,edp",
    [
        ({}, 1, 1, 1, 1),
        ({"dp_shard": 8}, 8, 8, 8, 8),
        ({"dp_shard": 8, "ep": 8}, 8, 8, 1, 1),
        ({"dp_shard": 4, "ep": 2, "tp": 2}, 4, 4, 2, 2),
        ({"dp_replicate": 2, "dp_shard": 4, "ep": 4}, 8, 8, 1, 2),
        ({"dp_replicate": 2, "dp_shard": 2, "cp": 2, "ep": 4}, 4, 8, 1, 2),
        ({"dp_shard": 2, "cp": 4, "ep": 2}, 2, 8, 4, 4),
        ({"dp_shard": 3, "cp": 2, "ep": 3}, 3, 6, 2, 2),
        ({"pp": 2, "dp_replicate": 3, "ep": 1}, 3, 3, 1, 3),
    ],
)
def test_derived_degrees(layout, dp, dp_cp, edp_shard, edp):
    world = 1
    for axis in ("dp_replicate", "dp_shard", "cp", "tp", "pp"):
        world *= layout.get(axis, 1)
    dims = ParallelDims(world_size=world, **layout)
    assert (dims.dp, dims.dp_cp, dims.edp_shard, dims.edp) == (dp, dp_cp, edp_shard, edp)
    # Attention and experts cover the same ranks per pipeline stage and tensor slice.
    assert dims.edp * dims.ep == dims.dp_cp == dims.world_size // (dims.pp * dims.tp)


def test_enabled_flags():
    dims = ParallelDims(dp_replicate=2, dp_shard=2, tp=2, ep=2, world_size=8)
    assert dims.dp_replicate_enabled and dims.fsdp_enabled and dims.hsdp_enabled and dims.dp_enabled
    assert dims.tp_enabled and dims.ep_enabled
    assert not (dims.cp_enabled or dims.pp_enabled)
    # context ranks shard parameters too (FSDP over dp_shard x cp)
    dims = ParallelDims(cp=2, world_size=2)
    assert dims.fsdp_enabled and dims.cp_enabled and not dims.dp_enabled and not dims.hsdp_enabled
    dims = ParallelDims(dp_replicate=2, world_size=2)
    assert dims.dp_enabled and not dims.fsdp_enabled and not dims.hsdp_enabled
    one = ParallelDims()
    flags = ("dp_replicate", "fsdp", "hsdp", "dp", "cp", "tp", "pp", "ep")
    assert not any(getattr(one, f"{f}_enabled") for f in flags)


def test_frozen_and_described():
    dims = ParallelDims(dp_shard=4, ep=2, world_size=4)
    with pytest.raises(AttributeError):
        dims.tp = 2
    assert dims.describe() == "pp 1 x dp_replicate 1 x dp_shard 4 x cp 1 x tp 1; experts ep 2 x edp 2"


def test_build_mesh_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        ParallelDims().build_mesh("cpu")
