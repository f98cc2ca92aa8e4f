"""Context parallelism trains exactly like one process with the same global batch, in both
styles and composed with every other layout; checkpoints move between cp degrees.

The recipe of tests/distributed/training.py (MoE with a sequence-level auxiliary loss and the
loss-free bias, documents packed and masked) at 64 tokens; its MoBA variant runs blocks of 8,
top 2, the last layer full attention (the paper's hybrid). fp32 within 1e-5 relative (losses,
evaluation losses, every parameter after the steps, expert loads exact); bf16 within 2x bf16's
own error. Every layout of one world size trains in one spawn (one Trainer after another on
the same process group), which keeps this tier to about a minute on two cores.
"""

import pytest
from training import (
    BF16,
    RECIPE,
    Layout,
    TrainedLayouts,
    assert_resumed_like_straight,
    assert_same_training,
    assert_within_bf16_error,
    single_process,
)

# One spawn trains every layout of a world size, inside the first test that needs it (minutes on
# two cores): the time-out only catches a hang (tests/slowdown.py).
pytestmark = pytest.mark.timeout(1800)

CP2 = ["parallel.context=2"]
ULYSSES = ["parallel.context_style=ulysses"]
AC = "parallel.activation_checkpointing=full"
# name: (recipe, overrides)
MODELS = {
    "recipe": (RECIPE, []),
    "unmasked": (RECIPE, ["attention.document_masking=false"]),
    "global-aux": (RECIPE, ["moe.aux_loss_level=global", "moe.aux_loss_coeff=0.01"]),
    # Multi-token prediction: each context rank divides its share of a depth's loss by its share of
    # the whole micro-batch's targets (model/mtp.py).
    "mtp": (RECIPE, ["model.mtp_depth=2"]),
    "moba-hybrid": (
        RECIPE,
        [
            "attention.backend=moba",
            "attention.moba_block_size=8",
            "attention.moba_topk=2",
            "attention.moba_full_last=1",
        ],
    ),
    # configs/long-moba.yaml shrunk for a CPU at 4K tokens (MoBA as shipped: blocks of 512, top 3, grouped-query
    # heads, the last layer full attention, activation checkpointing), one step in one process; the layout puts
    # it on context 2 with the experts folded onto it.
    "long-moba-cpu": (
        "long-moba",
        [
            "model.vocab_size=320",
            "model.dim=64",
            "model.n_layers=2",
            "model.ffn_hidden=128",
            "model.max_seq_len=4096",
            "attention.n_heads=2",
            "attention.n_kv_heads=1",
            "attention.moba_full_last=1",
            "moe.num_experts=4",
            "moe.top_k=2",
            "moe.expert_hidden=32",
            "moe.expert_backend=auto",
            "data.seq_len=4096",
            "data.max_documents=200",
            "trainer.micro_batch_size=1",
            "trainer.steps=1",
            "trainer.grad_accum_steps=1",
            "trainer.precision=fp32",
            "parallel.context=1",
            "parallel.expert=1",
        ],
    ),
}

# name: (world size, data-parallel degree, model, overrides)
LAYOUTS = {
    "cp2": (2, 1, "recipe", CP2),
    "cp2-ulysses": (2, 1, "recipe", [*CP2, *ULYSSES]),
    "cp2-unmasked": (2, 1, "unmasked", CP2),
    "cp2-global-aux": (2, 1, "global-aux", CP2),
    "cp2-mtp": (2, 1, "mtp", CP2),
    "cp2-moba-hybrid": (2, 1, "moba-hybrid", CP2),
    "cp2-ulysses-moba-hybrid": (2, 1, "moba-hybrid", [*CP2, *ULYSSES]),
    "cp2xep2": (2, 1, "recipe", [*CP2, "parallel.expert=2"]),
    "cp2+ac+compile": (2, 1, "recipe", [*CP2, AC, "parallel.compile=true"]),
    "cp4": (4, 1, "recipe", ["parallel.context=4"]),
    "cp4-ulysses-moba-hybrid": (4, 1, "moba-hybrid", ["parallel.context=4", *ULYSSES]),
    "cp2xtp2": (4, 1, "recipe", [*CP2, "parallel.tensor=2"]),
    "cp2xdp2": (4, 2, "recipe", [*CP2, "parallel.data_parallel_shard=2"]),
    "cp2xpp2": (4, 1, "recipe", [*CP2, "parallel.pipeline=2"]),
    "cp2xtp2-ulysses+ac": (4, 1, "recipe", [*CP2, "parallel.tensor=2", *ULYSSES, AC]),
    "long-moba-cpu-cp2xep2": (2, 1, "long-moba-cpu", [*CP2, "parallel.expert=2"]),
}
BF16_LAYOUTS = {
    "cp2-bf16": (2, 1, "recipe", [*CP2, *BF16]),
    "cp2xtp2-bf16": (4, 1, "recipe", [*CP2, "parallel.tensor=2", *BF16]),
}


RESHARDS = {"one process->cp2": (None, "cp2"), "cp2->one process": ("cp2", None)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    layouts = {}
    for name, (world, dp, model, overrides) in {**LAYOUTS, **BF16_LAYOUTS}.items():
        recipe, model_overrides = MODELS[model]
        layouts[name] = Layout(world, dp, [*model_overrides, *overrides], recipe, save=name in LAYOUTS)
    return TrainedLayouts(tmp_path_factory, layouts, RESHARDS)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    cache = {}

    def get(model, *overrides):
        key = (model, *overrides)
        if key not in cache:
            recipe, model_overrides = MODELS[model]
            run_dir = tmp_path_factory.mktemp("single")
            cache[key] = single_process(run_dir, *model_overrides, *overrides, recipe=recipe)
        return cache[key]

    return get


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_context_parallel_trains_like_one_process(trained, single, layout):
    assert_same_training(trained[layout], single(LAYOUTS[layout][2]))


@pytest.mark.parametrize("layout", list(BF16_LAYOUTS))
def test_context_parallel_in_bf16_within_twice_bf16s_own_error(trained, single, layout):
    model = BF16_LAYOUTS[layout][2]
    assert_within_bf16_error(trained[layout], single(model, *BF16), single(model))


@pytest.mark.parametrize("reshard", list(RESHARDS))
def test_checkpoint_moves_between_context_degrees(trained, single, reshard):
    assert_resumed_like_straight(trained[reshard], single("recipe"))
