"""The loaders read the same windows at every step for every layout of a global batch: each
(micro_batch_size B, data-parallel ranks W, grad_accum_steps A) with B x W x A = G, across epoch
ends and several epochs, and after a resume from another layout's saved state; a blend too."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sparsetron.train.data import PackedDataset, TrainLoader
from sparsetron.train.data.blend import BlendLoader

S = 4
G = 12


def layouts(g: int) -> list[tuple[int, int, int]]:
    """Every (B, W, A) with B x W x A = g."""
    return [
        (b, w, g // (b * w)) for b in range(1, g + 1) if g % b == 0 for w in range(1, g // b + 1) if g // b % w == 0
    ]


def numbered(n_windows: int, offset: int = 0) -> PackedDataset:
    """Token offset + i at stream position i, so a window's first input names it."""
    return PackedDataset(np.arange(n_windows * S + 1, dtype=np.int64) + offset, np.array([0]), S)


def ids(batch) -> list[int]:
    return (batch.tokens[:, 0] // S).tolist()


def read_steps(make, layout, steps, state=None):
    """Each step's windows over all ranks and micro-batches (sorted), and the ranks' common state after."""
    B, W, A = layout
    loaders = [make(B, W, A, r) for r in range(W)]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(json.loads(json.dumps(state)))
    out = []
    for _ in range(steps):
        per_rank = [next(loader) for loader in loaders]
        assert all(len(micro) == A for micro in per_rank)
        assert all(batch.tokens.shape == (B, S) for micro in per_rank for batch in micro)
        out.append(sorted(w for micro in per_rank for batch in micro for w in ids(batch)))
    (after,) = {json.dumps(loader.state_dict(), sort_keys=True) for loader in loaders}
    return out, json.loads(after)


def test_every_layout_of_a_global_batch_reads_the_same_windows_each_step():
    rng = np.random.default_rng()
    n = int(rng.integers(2 * G + 1, 5 * G))
    n += n % G == 0  # a short tail: every epoch ends with windows left over
    seed = int(rng.integers(1 << 30))
    ds = numbered(n)
    per_epoch = n // G
    steps = 3 * per_epoch + 2  # into the fourth epoch
    expected = []
    for epoch in range(4):
        perm = np.random.default_rng((seed, epoch)).permutation(n)
        expected += [sorted(perm[i * G : (i + 1) * G].tolist()) for i in range(per_epoch)]
    for layout in layouts(G):
        seen, _ = read_steps(lambda B, W, A, r: TrainLoader(ds, B, seed, r, W, A), layout, steps)
        assert seen == expected[:steps], layout  # G distinct windows a step, rolled over by G


def test_resume_at_another_layout_continues_the_straight_run():
    rng = np.random.default_rng()
    n = int(rng.integers(2 * G + 1, 4 * G)) | 1
    seed = int(rng.integers(1 << 30))
    ds = numbered(n)
    make = lambda B, W, A, r: TrainLoader(ds, B, seed, r, W, A)  # noqa: E731
    straight, _ = read_steps(make, (G, 1, 1), 12)
    all_layouts = layouts(G)
    for source in all_layouts:
        target = all_layouts[int(rng.integers(len(all_layouts)))]
        k = int(rng.integers(1, 8))
        first, state = read_steps(make, source, k)
        assert set(state) == {"epoch", "index"}  # the format checkpoints have always held
        rest, _ = read_steps(make, target, 12 - k, state)
        assert first + rest == straight, (source, target, k)


def test_a_blend_reads_the_same_draws_each_step_at_every_layout_and_after_a_resume():
    rng = np.random.default_rng()
    # Source s's windows are numbered from s * 1000; the small one wraps within the run.
    datasets = [numbered(int(rng.integers(5, 9))), numbered(200, 1000 * S), numbered(300, 2000 * S)]
    weights = rng.uniform(0.2, 1.0, size=3).tolist()
    seed = int(rng.integers(1 << 30))

    def make(B, W, A, r):
        return BlendLoader(datasets, weights, ["a", "b", "c"], B, seed, r, W, A)

    straight, after = read_steps(make, (G, 1, 1), 8)
    assert after["blend_draws"][0] > len(datasets[0])  # the small source wrapped within the run
    all_layouts = layouts(G)
    for source in all_layouts:
        target = all_layouts[int(rng.integers(len(all_layouts)))]
        k = int(rng.integers(1, 7))
        first, state = read_steps(make, source, k)
        rest, _ = read_steps(make, target, 8 - k, state)
        assert first + rest == straight, (source, target, k)


@pytest.mark.parametrize("index", [0, 3, 7])
def test_a_saved_position_between_global_batches_still_loads(index):
    # Checkpoints written before the loader read a step at a time hold any multiple of B x W.
    ds = numbered(3 * G + 5)
    loader = TrainLoader(ds, 2, seed=5, grad_accum_steps=G // 2)
    loader.load_state_dict({"epoch": 2, "index": index})
    perm = np.random.default_rng((5, 2)).permutation(len(ds))
    assert [w for batch in next(loader) for w in ids(batch)] == perm[index : index + G].tolist()
