"""Data sources: each source's stream and boundaries against the tokenizer, and each source's errors."""

from __future__ import annotations

import json
import os
import random
import socket
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from sparsetron.train.config import DataConfig
from sparsetron.train.data import ByteTokenizer, DataError, HFTokenizer, build_datasets, load_documents, stdlib_files

BYTE = ByteTokenizer()


def random_docs(n: int, rng: random.Random | None = None) -> list[str]:
    rng = rng or random.Random()
    alphabet = "abcxyz \n\t{}()é漢字🙂"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 120))) for _ in range(n)]


def expected_stream(docs: list[str], tok=BYTE) -> tuple[list[int], list[int]]:
    tokens, starts = [], []
    for d in docs:
        starts.append(len(tokens))
        tokens += [*tok.encode(d), tok.eos_id]
    return tokens, starts


def assert_stream(got, docs: list[str], tok=BYTE) -> None:
    tokens, starts = expected_stream(docs, tok)
    assert got.tokens.tolist() == tokens
    assert got.doc_starts.tolist() == starts


def write_megatron(prefix: str, docs: list[np.ndarray], dtype=np.uint16) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        # Two sequences per document, as a sentence-split corpus would store it.
        half = len(doc) // 2
        builder.add_document(doc, [half, len(doc) - half])
    builder.finalize(prefix + ".idx")


# ---------------------------------------------------------------- text / jsonl / parquet


def test_text_files_sorted_glob_and_max_documents(tmp_path):
    docs = random_docs(9)
    order = list(range(9))
    random.shuffle(order)  # create in a random order: the stream must follow the sorted names
    for i in order:
        (tmp_path / f"doc_{i:02d}.txt").write_text(docs[i], encoding="utf-8")
    assert_stream(load_documents(DataConfig(source="text", paths=[str(tmp_path / "*.txt")]), BYTE), docs)
    cfg = DataConfig(source="text", paths=[str(tmp_path / "doc_0[5-8].txt"), str(tmp_path / "doc_00.txt")])
    assert_stream(load_documents(cfg, BYTE), docs[5:9] + docs[:1])
    cfg.max_documents = 2
    assert_stream(load_documents(cfg, BYTE), docs[5:7])


def test_jsonl_and_parquet_match_the_tokenizer(tmp_path):
    docs = random_docs(40)
    rows = [{"content": d, "id": i} for i, d in enumerate(docs)]
    rows.insert(3, {"content": "", "id": -1})  # an empty text is skipped, not a lone eos
    for name, part in (("a.jsonl", rows[:20]), ("b.jsonl", rows[20:])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(rows[:25]), tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[25:]), tmp_path / "b.parquet")
    for source in ("jsonl", "parquet"):
        cfg = DataConfig(source=source, paths=[str(tmp_path / f"*.{source}")], text_key="content")
        got = load_documents(cfg, BYTE)
        assert got.tokens.dtype == np.uint16
        assert_stream(got, docs)
        cfg.max_documents = 5
        assert_stream(load_documents(cfg, BYTE), docs[:5])


def test_table_sources_never_touch_the_network(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    docs = random_docs(5)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    assert_stream(load_documents(DataConfig(source="jsonl", paths=[str(tmp_path / "d.jsonl")]), BYTE), docs)


def test_hf_tokenizer_source(tmp_path):
    words = ["".join(random.choice("abcd") for _ in range(3)) for _ in range(50)]
    wl = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    wl.train_from_iterator(words, trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"]))
    wl.save(str(tmp_path / "tokenizer.json"))
    tok = HFTokenizer(str(tmp_path))
    assert tok.eos_token == "</s>"
    docs = [" ".join(random.choice(words) for _ in range(20)) for _ in range(10)]
    for i, d in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(d)
    got = load_documents(DataConfig(source="text", paths=[str(tmp_path / "*.txt")]), tok)
    assert got.tokens.dtype == np.uint16
    assert_stream(got, docs, tok)


def test_missing_key_names_the_file_and_columns(tmp_path):
    good, bad = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    good.write_text(json.dumps({"text": "hello"}) + "\n")
    bad.write_text("\n" + json.dumps({"body": "hello", "title": "x"}) + "\n")
    with pytest.raises(DataError, match=rf"{bad}:2: no key 'text'.*body.*title"):
        load_documents(DataConfig(source="jsonl", paths=[str(good), str(bad)]), BYTE)
    with pytest.raises(DataError, match=rf"{good}:1: no key 'body'.*text"):
        load_documents(DataConfig(source="jsonl", paths=[str(good)], text_key="body"), BYTE)
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=rf"{tmp_path / 'c.parquet'} has no column 'text'.*body"):
        load_documents(DataConfig(source="parquet", paths=[str(tmp_path / "c.parquet")]), BYTE)
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match="not text"):
        load_documents(DataConfig(source="parquet", paths=[str(tmp_path / "d.parquet")]), BYTE)


@pytest.mark.parametrize("source", ["text", "jsonl", "parquet"])
def test_path_errors_name_the_path(tmp_path, source):
    missing = str(tmp_path / f"missing.{source}")
    with pytest.raises(DataError, match=f"not found: {missing}"):
        load_documents(DataConfig(source=source, paths=[missing]), BYTE)
    pattern = str(tmp_path / "nothing_*")
    with pytest.raises(DataError, match="glob '.*nothing_\\*' matches no file"):
        load_documents(DataConfig(source=source, paths=[pattern]), BYTE)
    empty = tmp_path / f"empty.{source}"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=f"empty: {empty}"):
        load_documents(DataConfig(source=source, paths=[str(empty)]), BYTE)
    with pytest.raises(DataError, match="not a file"):
        load_documents(DataConfig(source=source, paths=[str(tmp_path)]), BYTE)
    with pytest.raises(DataError, match="paths is empty"):
        load_documents(DataConfig(source=source, paths=[]), BYTE)


def test_errors_come_before_reading(tmp_path, monkeypatch):
    """A bad last path fails before the good first one is read."""
    good = tmp_path / "a.jsonl"
    good.write_text(json.dumps({"text": "x"}) + "\n")
    from sparsetron.train.data import prepare

    monkeypatch.setattr(prepare, "read_tasks", lambda *a, **k: pytest.fail("read before checking paths"))
    with pytest.raises(DataError, match="not found"):
        load_documents(DataConfig(source="jsonl", paths=[str(good), str(tmp_path / "gone.jsonl")]), BYTE)


def test_zero_documents_and_bad_text(tmp_path):
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(DataError, match=f"{blank}: no documents"):
        load_documents(DataConfig(source="jsonl", paths=[str(blank)]), BYTE)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("ok\ncafé".encode("latin-1"))
    with pytest.raises(DataError, match=f"{latin}:2: not UTF-8 text"):
        load_documents(DataConfig(source="text", paths=[str(latin)]), BYTE)


# ---------------------------------------------------------------- megatron


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megatron_reads_index_boundaries_from_a_memmap(tmp_path, dtype):
    rng = np.random.default_rng()
    docs = [rng.integers(0, 257, rng.integers(2, 50)) for _ in range(30)]
    prefix = str(tmp_path / "shard")
    write_megatron(prefix, docs, dtype)
    got = load_documents(DataConfig(source="megatron", paths=[prefix]), BYTE)
    assert isinstance(got.tokens, np.memmap) and got.tokens.dtype == dtype  # no copy of the .bin
    np.testing.assert_array_equal(got.tokens, np.concatenate(docs))
    np.testing.assert_array_equal(got.doc_starts, np.cumsum([0] + [len(d) for d in docs[:-1]]))
    # A path given with its suffix names the same pair; max_documents cuts at a boundary.
    got = load_documents(DataConfig(source="megatron", paths=[prefix + ".bin"], max_documents=4), BYTE)
    np.testing.assert_array_equal(got.tokens, np.concatenate(docs[:4]))
    assert got.n_documents == 4
    # And on through packing: windows read straight from the memmap.
    train, val = build_datasets(DataConfig(source="megatron", paths=[prefix], seq_len=8, val_fraction=0.2), BYTE)
    stream = np.concatenate(docs)
    np.testing.assert_array_equal(np.concatenate([train.tokens, val.tokens]), stream)
    inputs, targets, _ = train.gather(np.arange(len(train)))
    np.testing.assert_array_equal(inputs.reshape(-1), stream[: len(train) * 8])


def test_megatron_glob_of_shards(tmp_path):
    rng = np.random.default_rng()
    shards = [[rng.integers(0, 257, rng.integers(2, 30)) for _ in range(5)] for _ in range(3)]
    for i, docs in enumerate(shards):
        write_megatron(str(tmp_path / f"part_{i}"), docs)
    got = load_documents(DataConfig(source="megatron", paths=[str(tmp_path / "part_*")]), BYTE)
    flat = [d for docs in shards for d in docs]
    np.testing.assert_array_equal(got.tokens, np.concatenate(flat))
    np.testing.assert_array_equal(got.doc_starts, np.cumsum([0] + [len(d) for d in flat[:-1]]))
    got = load_documents(DataConfig(source="megatron", paths=[str(tmp_path / "part_*")], max_documents=7), BYTE)
    np.testing.assert_array_equal(got.tokens, np.concatenate(flat[:7]))


def test_megatron_errors(tmp_path):
    prefix = str(tmp_path / "big")
    write_megatron(prefix, [np.array([1, 2, 3]), np.array([4, 1000, 5])])
    with pytest.raises(DataError, match=rf"{prefix}.bin .*1000.*vocab_size 257"):
        load_documents(DataConfig(source="megatron", paths=[prefix]), BYTE)
    os.remove(prefix + ".idx")
    with pytest.raises(DataError, match=f"not found: {prefix}.idx"):
        load_documents(DataConfig(source="megatron", paths=[prefix]), BYTE)
    empty = str(tmp_path / "empty")
    write_megatron(empty, [np.array([1, 2])])
    open(empty + ".bin", "wb").close()
    with pytest.raises(DataError, match=f"empty: {empty}.bin"):
        load_documents(DataConfig(source="megatron", paths=[empty]), BYTE)
    with pytest.raises(DataError, match="matches no file"):
        load_documents(DataConfig(source="megatron", paths=[str(tmp_path / "none_*")]), BYTE)
    corrupt = str(tmp_path / "corrupt")
    write_megatron(corrupt, [np.array([1, 2])])
    with open(corrupt + ".idx", "r+b") as f:
        f.write(b"garbage!")
    with pytest.raises(DataError, match=f"{corrupt}.idx"):
        load_documents(DataConfig(source="megatron", paths=[corrupt]), BYTE)
    short = str(tmp_path / "short")
    write_megatron(short, [np.arange(10), np.arange(10)])
    with open(short + ".bin", "r+b") as f:
        f.truncate(30)
    with pytest.raises(DataError, match=f"{short}.bin is truncated"):
        load_documents(DataConfig(source="megatron", paths=[short]), BYTE)
    with open(short + ".idx", "r+b") as f:
        f.truncate(40)
    with pytest.raises(DataError, match=f"{short}.idx: it describes 4 sequences"):
        load_documents(DataConfig(source="megatron", paths=[short]), BYTE)


# ---------------------------------------------------------------- stdlib


def test_stdlib_deterministic_per_seed():
    a = load_documents(DataConfig(max_documents=12, seed=1), BYTE)
    b = load_documents(DataConfig(max_documents=12, seed=1), BYTE)
    c = load_documents(DataConfig(max_documents=12, seed=2), BYTE)
    assert a.n_documents == 12
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.doc_starts, b.doc_starts)
    assert not np.array_equal(a.tokens[: c.n_tokens], c.tokens[: a.n_tokens])
    # Every document is a whole stdlib file, followed by eos.
    root, rel_paths = stdlib_files()
    assert not any("site-packages" in p or "dist-packages" in p for p in rel_paths)
    ends = np.append(a.doc_starts[1:], a.n_tokens)
    first = bytes(a.tokens[: ends[0] - 1].astype(np.uint8))
    assert a.tokens[ends[0] - 1] == BYTE.eos_id
    same_size = [p for p in rel_paths if os.path.getsize(os.path.join(root, p)) == len(first)]
    assert any(open(os.path.join(root, p), "rb").read() == first for p in same_size)
