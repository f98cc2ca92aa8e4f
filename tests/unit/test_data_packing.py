"""Packing: windows cover the stream, targets shift by one, doc_ids follow eos, splits keep documents whole."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsetron.train.data import DataError, PackedDataset, split_train_val

EOS = 256


def random_stream(rng: np.random.Generator, n_docs: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Documents of random bytes (never eos), each ended by eos, as (tokens, doc_starts)."""
    docs = [rng.integers(0, 256, rng.integers(0, max_len)) for _ in range(n_docs)]
    tokens = np.concatenate([np.append(d, EOS) for d in docs]).astype(np.uint16)
    lengths = np.array([len(d) + 1 for d in docs])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return tokens, starts


def all_windows(ds: PackedDataset):
    return ds.gather(np.arange(len(ds)))


@pytest.mark.parametrize("seq_len", [1, 7, 64, 255])
def test_windows_cover_the_stream_once_and_targets_shift(seq_len):
    rng = np.random.default_rng()
    tokens, starts = random_stream(rng, n_docs=int(rng.integers(20, 60)), max_len=100)
    ds = PackedDataset(tokens, starts, seq_len)
    assert len(ds) == (len(tokens) - 1) // seq_len
    inputs, targets, _ = all_windows(ds)
    assert inputs.dtype == targets.dtype == np.int64
    covered = len(ds) * seq_len
    # Inputs of all windows, in order, are the stream without gaps or repeats; targets
    # are the same stream one position later, across window edges too.
    np.testing.assert_array_equal(inputs.reshape(-1), tokens[:covered])
    np.testing.assert_array_equal(targets.reshape(-1), tokens[1 : covered + 1])
    assert len(tokens) - covered - 1 < seq_len  # only a tail shorter than a window is left


def test_doc_ids_change_exactly_after_eos():
    rng = np.random.default_rng()
    tokens, starts = random_stream(rng, n_docs=200, max_len=40)
    ds = PackedDataset(tokens, starts, 37)
    inputs, _, doc_ids = all_windows(ds)
    assert (doc_ids[:, 0] == 0).all()
    steps = np.diff(doc_ids, axis=1)
    assert set(np.unique(steps).tolist()) <= {0, 1}
    np.testing.assert_array_equal(steps == 1, inputs[:, :-1] == EOS)
    # And against the plain definition: document index of each input position, rebased per window.
    for i in rng.integers(0, len(ds), 20):
        pos = np.arange(i * 37, i * 37 + 37)
        doc = np.array([np.nonzero(starts <= p)[0][-1] for p in pos])
        np.testing.assert_array_equal(doc_ids[i], doc - doc[0])


def test_getitem_returns_int64_tensors():
    tokens, starts = random_stream(np.random.default_rng(), 30, 50)
    ds = PackedDataset(tokens, starts, 16)
    x, y, d = ds[len(ds) - 1]
    assert all(t.dtype == torch.int64 and t.shape == (16,) for t in (x, y, d))
    np.testing.assert_array_equal(x.numpy(), tokens[(len(ds) - 1) * 16 : len(ds) * 16])
    assert torch.equal(ds[-1][0], x)
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(IndexError):
        ds.gather([0, len(ds)])


def test_memmap_stream(tmp_path):
    tokens, starts = random_stream(np.random.default_rng(), 50, 60)
    path = tmp_path / "tokens.bin"
    tokens.tofile(path)
    mm = np.memmap(path, dtype=np.uint16, mode="r")
    a, b = PackedDataset(mm, starts, 20), PackedDataset(tokens, starts, 20)
    for x, y in zip(all_windows(a), all_windows(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_split_is_whole_documents_and_disjoint():
    rng = np.random.default_rng()
    tokens, starts = random_stream(rng, n_docs=300, max_len=80)
    train, val = split_train_val(tokens, starts, seq_len=32, val_fraction=0.1)
    assert val.n_documents == 30 and train.n_documents == 270
    # The two splits are the stream cut at a document start, nothing shared or dropped.
    cut = len(train.tokens)
    assert cut == starts[270]
    np.testing.assert_array_equal(np.concatenate([train.tokens, val.tokens]), tokens)
    assert train.tokens[-1] == EOS and val.tokens[-1] == EOS
    np.testing.assert_array_equal(val.doc_starts, starts[270:] - cut)
    np.testing.assert_array_equal(train.doc_starts, starts[:270])


def test_split_grows_val_to_one_window():
    # 20 documents of 10 tokens: 5% is one document, too short for a window of 33.
    tokens = np.tile(np.append(np.arange(9, dtype=np.uint16), EOS), 20)
    starts = np.arange(20) * 10
    train, val = split_train_val(tokens, starts, seq_len=32, val_fraction=0.05)
    assert val.n_documents == 4 and len(val) == 1
    assert train.n_documents == 16


def test_split_errors_name_sizes():
    tokens = np.tile(np.append(np.arange(9, dtype=np.uint16), EOS), 4)
    starts = np.arange(4) * 10
    with pytest.raises(DataError, match=r"40 tokens.*seq_len\+1 = 65"):
        split_train_val(tokens, starts, seq_len=64, val_fraction=0.25)
    with pytest.raises(DataError, match=r"seq_len\+1 = 31"):
        split_train_val(tokens, starts, seq_len=30, val_fraction=0.25)  # val eats everything
    with pytest.raises(DataError, match="2 documents"):
        split_train_val(tokens, np.array([0]), seq_len=4, val_fraction=0.5)
    with pytest.raises(DataError, match="seq_len"):
        PackedDataset(tokens[:8], np.array([0]), 8)
