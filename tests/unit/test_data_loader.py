"""Loaders: seeded epochs, exact resume from a saved state, disjoint ranks, the same windows per step
for every layout of a global batch (also across epochs and a resume), in-order evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sparsetron.train.config import DataConfig
from sparsetron.train.data import (
    Batch,
    ByteTokenizer,
    DataError,
    PackedDataset,
    TrainLoader,
    build_datasets,
    eval_batches,
)

S = 8


def numbered_dataset(n_windows: int) -> PackedDataset:
    """Token i at stream position i, so a window's first input names the window (it // S)."""
    tokens = np.arange(n_windows * S + 1, dtype=np.int32)
    return PackedDataset(tokens, np.arange(0, len(tokens), 5), S)


def window_ids(batch: Batch) -> list[int]:
    return (batch.tokens[:, 0] // S).tolist()


def one(step: list[Batch]) -> Batch:
    """The only micro-batch of a step without accumulation."""
    (batch,) = step
    return batch


def assert_same(a: Batch, b: Batch) -> None:
    for x, y in ((a.tokens, b.tokens), (a.targets, b.targets), (a.doc_ids, b.doc_ids)):
        assert x.dtype == y.dtype == torch.int64
        assert torch.equal(x, y)


def test_epochs_are_seeded_permutations():
    ds = numbered_dataset(37)
    loader = TrainLoader(ds, micro_batch_size=4, seed=3)
    assert loader.steps_per_epoch == 9
    epochs = [[w for _ in range(9) for w in window_ids(one(next(loader)))] for _ in range(3)]
    for e, seen in enumerate(epochs):
        assert len(set(seen)) == 36  # no window twice in an epoch
        expected = np.random.default_rng((3, e)).permutation(37)[:36].tolist()
        assert seen == expected
    assert epochs[0] != epochs[1]
    other = TrainLoader(ds, micro_batch_size=4, seed=4)
    assert [w for _ in range(9) for w in window_ids(one(next(other)))] != epochs[0]


@pytest.mark.parametrize("k", [0, 5, 9, 13])
def test_resume_yields_the_same_batches(k):
    rng = np.random.default_rng()
    tokens = rng.integers(0, 257, 37 * S + 1 + int(rng.integers(0, S)))
    starts = np.unique(np.concatenate([[0], rng.integers(1, len(tokens), 40)]))
    ds = PackedDataset(tokens, starts, S)
    seed = int(rng.integers(1 << 30))
    original = TrainLoader(ds, 4, seed)
    for _ in range(k):
        next(original)
    state = json.loads(json.dumps(original.state_dict()))  # survives a plain-JSON checkpoint
    assert set(state) == {"epoch", "index"} and all(type(v) is int for v in state.values())
    restored = TrainLoader(ds, 4, seed)
    restored.load_state_dict(state)
    for _ in range(12):  # 9 batches per epoch: every k crosses an epoch boundary here
        assert_same(one(next(original)), one(next(restored)))
    assert original.state_dict() == restored.state_dict()


def test_ranks_take_disjoint_slices_of_the_global_batch():
    ds = numbered_dataset(50)
    world, micro = 3, 2
    whole = TrainLoader(ds, micro * world, seed=7)
    ranks = [TrainLoader(ds, micro, seed=7, rank=r, world_size=world) for r in range(world)]
    for _ in range(20):  # 8 steps an epoch: crosses two epoch boundaries
        global_batch = one(next(whole))
        parts = [one(next(loader)) for loader in ranks]
        for r, part in enumerate(parts):
            assert part.tokens.shape == (micro, S)
            assert torch.equal(part.tokens, global_batch.tokens[r::world])
        ids = [w for part in parts for w in window_ids(part)]
        assert len(set(ids)) == micro * world
    assert {tuple(loader.state_dict().items()) for loader in ranks} == {tuple(whole.state_dict().items())}


def test_eval_batches_in_order():
    ds = numbered_dataset(11)
    batches = eval_batches(ds, 3, 2)
    assert [window_ids(b) for b in batches] == [[0, 1, 2], [3, 4, 5]]
    assert [window_ids(b) for b in eval_batches(ds, 3, 100)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert [window_ids(b) for b in eval_batches(ds, 20, 4)] == [list(range(11))]  # one short batch
    assert eval_batches(ds, 3, 0) == []
    again = eval_batches(ds, 3, 2)
    for a, b in zip(batches, again, strict=True):
        assert_same(a, b)


def test_loader_errors():
    ds = numbered_dataset(5)
    with pytest.raises(DataError, match=r"5 windows.*micro_batch_size 3 x grad_accum_steps 1 x data-parallel 2 = 6"):
        TrainLoader(ds, 3, seed=0, rank=0, world_size=2)
    with pytest.raises(DataError, match="rank 2"):
        TrainLoader(ds, 1, seed=0, rank=2, world_size=2)
    loader = TrainLoader(ds, 1, seed=0)
    with pytest.raises(DataError, match="'index'"):
        loader.load_state_dict({"epoch": 0})
    with pytest.raises(DataError, match="5 windows"):
        loader.load_state_dict({"epoch": 0, "index": 6})


def test_build_datasets_end_to_end(tmp_path):
    rng = np.random.default_rng()
    for i in range(30):
        (tmp_path / f"{i:02d}.txt").write_bytes(bytes(rng.integers(32, 127, rng.integers(20, 200)).tolist()))
    cfg = DataConfig(source="text", paths=[str(tmp_path / "*.txt")], seq_len=32, val_fraction=0.1)
    train, val = build_datasets(cfg, ByteTokenizer())
    assert (train.n_documents, val.n_documents) == (27, 3)
    assert train.seq_len == val.seq_len == 32
    first_val = (tmp_path / "27.txt").read_bytes()
    assert bytes(val.tokens[: len(first_val)].astype(np.uint8)) == first_val
    batch = one(next(TrainLoader(train, 2, seed=0)))
    assert batch.tokens.shape == batch.targets.shape == batch.doc_ids.shape == (2, 32)
    assert batch.to("cpu").tokens.dtype == torch.int64
    assert all(t.is_contiguous() for t in (batch.tokens, batch.targets, batch.doc_ids))
