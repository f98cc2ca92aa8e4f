"""Low-dimension dispatch (moe.dispatch_dim) at the parallel layouts it meets: expert parallelism
exchanges r-wide rows, tensor parallelism sums the replicated projections' gradients, a pipeline
cuts between blocks that hold them, and a checkpoint of them resumes at another layout. Each
trains like one process with the same setting (tests/distributed/training.py; 1e-5 relative,
fp32), one spawn per world size.
"""

import pytest
from training import Layout, TrainedLayouts, assert_resumed_like_straight, assert_same_training, single_process

DISPATCH = ["moe.dispatch_dim=16"]  # debug-deepseek's dim is 64: a quarter, as BigMac's D / 4
LAYOUTS = {
    "ep2": (2, 2, ["parallel.data_parallel_shard=2", "parallel.expert=2"]),
    "ep4": (4, 4, ["parallel.data_parallel_shard=4", "parallel.expert=4"]),
    "ep2xtp2": (4, 2, ["parallel.tensor=2", "parallel.data_parallel_shard=2", "parallel.expert=2"]),
    "pp2xep2": (4, 2, ["parallel.pipeline=2", "parallel.data_parallel_shard=2", "parallel.expert=2"]),
}
# Written at ep2 after two steps, resumed at pp2 x ep2 for the third: the projections move from
# every rank's block to one stage's.
RESHARDS = {"ep2->pp2xep2": ("ep2", "pp2xep2")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    layouts = {name: Layout(world, dp, [*overrides, *DISPATCH]) for name, (world, dp, overrides) in LAYOUTS.items()}
    return TrainedLayouts(tmp_path_factory, layouts, RESHARDS)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return single_process(tmp_path_factory.mktemp("single"), *DISPATCH)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_with_dispatch_dim_trains_like_one_process(trained, reference, layout):
    assert any(".dispatch_down." in name for name in reference[2])
    assert_same_training(trained[layout], reference)


@pytest.mark.parametrize("reshard", list(RESHARDS))
def test_checkpoint_with_dispatch_dim_resumes_at_another_layout(trained, reference, reshard):
    assert_resumed_like_straight(trained[reshard], reference)
