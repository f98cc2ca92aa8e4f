"""Blending (data.blend): exact proportions, determinism, exact resume, wraparound said once,
disjoint ranks; and the views the loaders read through (ConcatTokens, masked document ends)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from sparsetron.train.config import DataConfig
from sparsetron.train.data import ByteTokenizer, DataError, PackedDataset, build_training_data
from sparsetron.train.data.blend import BlendLoader, blend_schedule
from sparsetron.train.data.packing import IGNORE_TARGET
from sparsetron.train.data.prepare import prepare
from sparsetron.train.data.tokens import ConcatTokens

BYTE = ByteTokenizer()


def packed(n_tokens: int, seq_len: int = 8, n_docs: int = 5, rng=None) -> PackedDataset:
    rng = rng or np.random.default_rng()
    tokens = rng.integers(0, 256, size=n_tokens).astype(np.uint16)
    starts = np.concatenate([[0], np.sort(rng.choice(np.arange(1, n_tokens), n_docs - 1, replace=False))])
    return PackedDataset(tokens, starts, seq_len)


def test_the_schedule_keeps_every_source_within_one_draw_of_its_share():
    rng = np.random.default_rng()
    weights = rng.uniform(0.1, 5.0, size=4)
    share = weights / weights.sum()
    counts = np.zeros(4, dtype=np.int64)
    picks = blend_schedule(weights, counts, 5000)
    seen = np.zeros(4)
    for n, s in enumerate(picks.tolist(), start=1):
        seen[s] += 1
        assert np.all(np.abs(seen - share * n) <= 1.0), (n, seen, share * n)
    # Drawn in two parts, the schedule continues exactly where it stopped.
    again = np.zeros(4, dtype=np.int64)
    assert np.array_equal(
        np.concatenate([blend_schedule(weights, again, 1234), blend_schedule(weights, again, 3766)]), picks
    )


def loaders(datasets, weights, seed, world=1, micro=3):
    names = [f"s{i}" for i in range(len(datasets))]
    return [BlendLoader(datasets, weights, names, micro, seed, r, world) for r in range(world)]


def batches_equal(a, b) -> bool:
    return all(np.array_equal(getattr(a, k).numpy(), getattr(b, k).numpy()) for k in ("tokens", "targets", "doc_ids"))


def test_blend_is_deterministic_resumes_exactly_and_splits_ranks():
    datasets = [packed(400), packed(90), packed(1000)]
    weights = [0.5, 0.2, 0.3]
    (a,) = loaders(datasets, weights, seed=7)
    (b,) = loaders(datasets, weights, seed=7)
    (c,) = loaders(datasets, weights, seed=8)
    first = [next(a)[0] for _ in range(30)]
    assert all(batches_equal(x, next(b)[0]) for x in first)
    assert not all(batches_equal(x, next(c)[0]) for x in first)
    # Resume from the state after 13 batches: the next 17 are bitwise those of the straight run.
    (d,) = loaders(datasets, weights, seed=7)
    for _ in range(13):
        next(d)
    state = d.state_dict()
    (resumed,) = loaders(datasets, weights, seed=7)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert all(batches_equal(x, next(resumed)[0]) for x in first[13:])
    # Two ranks read disjoint halves of the same global batch.
    (whole,) = loaders(datasets, weights, seed=7, micro=6)
    ranks = loaders(datasets, weights, seed=7, world=2)
    for _ in range(10):
        (full,), (r0,), (r1,) = next(whole), next(ranks[0]), next(ranks[1])
        assert np.array_equal(full.tokens[0::2].numpy(), r0.tokens.numpy())
        assert np.array_equal(full.tokens[1::2].numpy(), r1.tokens.numpy())


def test_a_source_that_runs_out_wraps_and_says_so_once():
    small, large = packed(8 * 10 + 1, n_docs=3), packed(8 * 200 + 1)
    (loader,) = loaders([small, large], [0.5, 0.5], seed=1, micro=4)
    windows = []
    for _ in range(20):  # 80 draws: 40 of the small source's 10 windows, 4 epochs
        windows.append(next(loader))
    assert len(loader.notices) == 1 and "s0 ran out after 10 windows" in loader.notices[0]
    scalars = loader.scalars()
    assert scalars["data/s0/epochs"] == 4.0 and scalars["data/s0/tokens"] == 40 * 8
    assert scalars["data/s1/epochs"] == 40 / 200
    # Each epoch of the small source reads each of its windows once.
    assert np.array_equal(np.sort(loader.counts), [40, 40])


def test_resume_refuses_a_state_of_another_blend():
    (loader,) = loaders([packed(100), packed(100)], [1, 1], seed=0)
    with pytest.raises(DataError, match="not the position of a blend of 2 sources"):
        loader.load_state_dict({"epoch": 0, "index": 0})


def test_concat_tokens_reads_like_the_concatenation():
    rng = np.random.default_rng()
    parts = [rng.integers(0, 1000, size=n).astype(np.uint16) for n in (5, 1, 17, 9)]
    whole = np.concatenate(parts)
    view = ConcatTokens(parts, np.uint16)
    assert len(view) == len(whole)
    pos = rng.integers(0, len(whole), size=(4, 6))
    assert np.array_equal(view[pos], whole[pos])
    sub = view[3:25]
    pos = rng.integers(0, 22, size=10)
    assert np.array_equal(sub[pos], whole[3:25][pos]) and len(sub) == 22


def test_mask_eos_target_ignores_exactly_the_targets_that_cross_a_document():
    rng = np.random.default_rng()
    plain, masked = packed(500, seq_len=16, n_docs=30, rng=np.random.default_rng(3)), None
    masked = PackedDataset(plain.tokens, plain.doc_starts, 16, mask_doc_ends=True)
    idx = rng.permutation(len(plain))[:8]
    for one in idx:  # a single window: its target slice is contiguous, masking must not reach the inputs
        assert np.array_equal(masked.gather([one])[0], plain.gather([one])[0])
    inputs, targets, doc_ids = plain.gather(idx)
    m_inputs, m_targets, m_doc_ids = masked.gather(idx)
    assert np.array_equal(inputs, m_inputs) and np.array_equal(doc_ids, m_doc_ids)
    target_pos = idx[:, None] * 16 + np.arange(1, 17)
    crosses = np.isin(target_pos, plain.doc_starts)
    assert crosses.any()
    assert np.all(m_targets[crosses] == IGNORE_TARGET) and np.array_equal(m_targets[~crosses], targets[~crosses])


def write_sources(tmp_path, n: int) -> list[str]:
    rng = random.Random()
    prefixes = []
    for i in range(n):
        path = tmp_path / f"src{i}.jsonl"
        docs = ["".join(rng.choice("abcdef \n") for _ in range(rng.randint(20, 200))) for _ in range(60 + 40 * i)]
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        prepare([str(path)], "byte", str(tmp_path / "prepared" / f"src{i}"), workers=0, progress="none")
        prefixes.append(str(tmp_path / "prepared" / f"src{i}"))
    return prefixes


def test_build_training_data_blends_prepared_sources_and_separate_validation(tmp_path):
    prefixes = write_sources(tmp_path, 3)
    cfg = DataConfig(source="megatron", blend=[[1.0, prefixes[0]], [3.0, str(tmp_path / "prepared" / "src1")]])
    cfg.seq_len, cfg.val_fraction = 16, 0.2  # held-out tails of 12 and 20 documents: dozens of windows each
    data = build_training_data(cfg, BYTE, micro_batch_size=4, n_eval=3)
    assert len(data.train) == 2 and len(data.eval_set) == 3
    # Evaluation interleaves the sources' held-out windows by weight: 1 of every 4 from source 0.
    assert data.val.sources[:8].tolist() == [1, 0, 1, 1, 1, 0, 1, 1]
    next(data.loader)
    assert sorted(data.loader.scalars()) == [
        "data/src0/epochs",
        "data/src0/tokens",
        "data/src1/epochs",
        "data/src1/tokens",
    ]
    cfg.val_paths = [prefixes[2]]
    data = build_training_data(cfg, BYTE, micro_batch_size=4, n_eval=2)
    assert data.train[0].n_documents == 60 and data.val.n_documents == 140
    cfg.blend = [[1.0, str(tmp_path / "nowhere")]]
    with pytest.raises(DataError, match=r"data.blend\[0\] .*nowhere.*not found"):
        build_training_data(cfg, BYTE, micro_batch_size=4, n_eval=2)
