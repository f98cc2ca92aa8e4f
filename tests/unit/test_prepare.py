"""`sparsetron prepare`: every format equals tokenizing in-process, megatron-core reads it back,
memory stays bounded, and bad input (missing, malformed, wrong key, existing output, an
interrupted run) fails naming the file and line and loses nothing."""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import subprocess
import sys
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from sparsetron.train.data import ByteTokenizer, DataError, HFTokenizer
from sparsetron.train.data import inputs as inputs_module
from sparsetron.train.data.indexed import IndexedWriter, megatron_prefixes, read_indexed
from sparsetron.train.data.prepare import prepare


def random_docs(n: int, rng: random.Random) -> list[str]:
    """Documents with newlines (some followed by spaces), quotes, backslashes and non-ASCII text."""
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 7))) for _ in range(60)]
    words += ["é", "漢字", "🙂", '"q"', "back\\slash", "tab\t"]
    docs = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 80)):
            parts.append(rng.choice(words))
            parts.append(rng.choice([" ", " ", " ", "\n", "\n ", "\n\n"]))
        docs.append("".join(parts).strip(" ") or "x")
    return docs


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> str:
    """A small byte-level BPE (as GPT-2 and Llama 3 use), saved as tokenizer.json."""
    rng = random.Random(0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(random_docs(200, rng), trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def write_corpus(folder, fmt: str, docs: list[str]) -> list[str]:
    """The inputs that hold `docs` in `fmt` (text: one file per document)."""
    lines = "".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs))
    if fmt == "jsonl":
        path = folder / "c.jsonl"
        path.write_text(lines, encoding="utf-8")
    elif fmt == "jsonl.gz":
        path = folder / "c.jsonl.gz"
        path.write_bytes(gzip.compress(lines.encode()))
    elif fmt == "jsonl.zst":
        path = folder / "c.jsonl.zst"
        path.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    elif fmt == "parquet":
        path = folder / "c.parquet"
        pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path, row_group_size=7)
    elif fmt == "hf":
        import datasets

        path = folder / "saved"
        datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(path))
    else:
        for i, d in enumerate(docs):
            (folder / f"doc_{i:03d}.txt").write_text(d, encoding="utf-8")
        return [str(folder / "doc_*.txt")]
    return [str(path)]


def read_back(prefix: str) -> list[np.ndarray]:
    """Each document's tokens, as megatron-core's own reader gives them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return [np.array(dataset[i]) for i in range(len(dataset))]  # copies: the maps close with `dataset`


def expected(docs: list[str], tok) -> list[np.ndarray]:
    return [np.append(tok.encode_batch([d])[0], tok.eos_id) for d in docs]


def assert_documents(prefix: str, docs: list[str], tok) -> None:
    got, want = read_back(prefix), expected(docs, tok)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.tolist() == w.tolist(), f"document {i}"


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "hf", "text"])
def test_each_format_equals_tokenizing_in_process(tmp_path, bpe, fmt, monkeypatch):
    # Pieces of 300 bytes: every record and text file is cut across many reads and tasks.
    monkeypatch.setattr(inputs_module, "CHUNK_BYTES", 300)
    docs = random_docs(60, random.Random())
    docs.append("x" * 1000 + "\nlast")  # a text with no safe cut for a while
    inputs = write_corpus(tmp_path, fmt, docs)
    result = prepare(inputs, bpe, str(tmp_path / "out" / "c"), workers=0, progress="none")
    tok = HFTokenizer(bpe)
    assert_documents(str(tmp_path / "out" / "c"), docs, tok)
    assert result.documents == len(docs) and result.tokens == sum(len(e) for e in expected(docs, tok))
    tokens, starts = read_indexed(str(tmp_path / "out" / "c"), None)
    assert tokens.dtype == np.uint16 and len(starts) == len(docs)


def test_worker_processes_write_the_same_bytes(tmp_path, bpe, monkeypatch):
    monkeypatch.setattr(inputs_module, "CHUNK_BYTES", 2000)  # read in the main process: many tasks
    docs = random_docs(150, random.Random())
    inputs = write_corpus(tmp_path, "jsonl", docs) + write_corpus(tmp_path, "parquet", docs)
    for workers in (0, 2):
        result = prepare(inputs, bpe, str(tmp_path / f"w{workers}"), workers=workers, progress="none")
        assert result.documents == 2 * len(docs)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"w0{suffix}").read_bytes() == (tmp_path / f"w2{suffix}").read_bytes()
    assert_documents(str(tmp_path / "w2"), docs + docs, HFTokenizer(bpe))
    assert result.peak_worker_mb > 0


def test_a_vocabulary_above_uint16_is_written_as_int32(tmp_path):
    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["<|endoftext|>"] = 70_000
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    docs = [" ".join(f"w{random.randrange(70_000)}" for _ in range(20)) for _ in range(10)]
    inputs = write_corpus(tmp_path, "jsonl", docs)
    prepare(inputs, str(tmp_path / "tokenizer.json"), str(tmp_path / "o"), workers=0, progress="none")
    tokens, _ = read_indexed(str(tmp_path / "o"), None)
    assert tokens.dtype == np.int32 and int(tokens.max()) >= 1 << 16
    assert_documents(str(tmp_path / "o"), docs, HFTokenizer(str(tmp_path / "tokenizer.json")))


def test_the_index_streams_across_chunks(tmp_path, monkeypatch):
    """Offsets are a running sum carried from chunk to chunk of the spilled lengths."""
    from sparsetron.train.data import indexed

    monkeypatch.setattr(indexed, "STREAM_ENTRIES", 3)
    rng = np.random.default_rng()
    docs = [rng.integers(0, 257, size=rng.integers(1, 9)).astype(np.uint16) for _ in range(20)]
    with IndexedWriter(str(tmp_path / "s"), np.uint16) as writer:
        # One document arrives in two calls (a text file read in pieces).
        writer.add(docs[0][:1], [1])
        writer.add(np.concatenate([docs[0][1:], *docs[1:7]]), [len(docs[0]) - 1, *map(len, docs[1:7])], True)
        writer.add(np.concatenate(docs[7:]), [len(d) for d in docs[7:]])
        writer.commit()
    assert [d.tolist() for d in read_back(str(tmp_path / "s"))] == [d.tolist() for d in docs]


def test_per_file_and_max_documents(tmp_path):
    byte = ByteTokenizer()
    a, b = random_docs(5, random.Random(1)), random_docs(7, random.Random(2))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in a))
    pq.write_table(pa.table({"text": b}), tmp_path / "b.parquet")
    inputs = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")]
    result = prepare(inputs, "byte", str(tmp_path / "each"), workers=0, per_file=True, progress="none")
    assert result.outputs == [str(tmp_path / "each" / "a"), str(tmp_path / "each" / "b")]
    assert_documents(str(tmp_path / "each" / "a"), a, byte)
    assert_documents(str(tmp_path / "each" / "b"), b, byte)
    assert megatron_prefixes([str(tmp_path / "each")]) == result.outputs
    prepare(inputs, "byte", str(tmp_path / "some"), workers=0, max_documents=6, progress="none")
    assert_documents(str(tmp_path / "some"), a + b[:1], byte)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.jsonl").write_text(json.dumps({"text": "y"}) + "\n")
    with pytest.raises(DataError, match=r"a.jsonl and .*x/a.jsonl would both write"):
        prepare([*inputs, str(tmp_path / "x" / "a.jsonl")], "byte", str(tmp_path / "clash"), per_file=True)


def test_memory_stays_bounded_as_the_input_grows(tmp_path):
    """Peak memory of the main process and of the worker, at 20 MB and at 200 MB of jsonl."""
    rng = np.random.default_rng()
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ", dtype=np.uint8)
    block = letters[rng.integers(0, len(letters), size=1 << 22)].tobytes()
    peaks = {}
    for mb in (20, 200):
        path = tmp_path / f"c{mb}.jsonl"
        with open(path, "wb") as f:
            written = 0
            while written < mb * 10**6:
                start, length = int(rng.integers(0, len(block) - 5000)), int(rng.integers(100, 5000))
                line = b'{"text": "' + block[start : start + length] + b'"}\n'
                f.write(line)
                written += len(line)
        done = subprocess.run(
            [sys.executable, "-m", "sparsetron.launch.cli", "prepare", "--input", str(path), "--tokenizer", "byte"]
            + ["--out", str(tmp_path / f"o{mb}"), "--workers", "1", "--progress", "none"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        main, worker = re.search(r"main process ([\d,]+) MB, each worker at most ([\d,]+) MB", done.stdout).groups()
        peaks[mb] = (float(main.replace(",", "")), float(worker.replace(",", "")))
        os.remove(path)
    # Ten times the input: a few MB of noise, never the input's 180 MB difference.
    assert peaks[200][0] < peaks[20][0] + 40, peaks
    assert peaks[200][1] < peaks[20][1] + 40, peaks


# ---------------------------------------------------------------- bad input


def files_in(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("chunk", [None, 40], ids=["one-piece", "many-pieces"])
def test_a_malformed_line_is_named_or_skipped(tmp_path, chunk, monkeypatch):
    if chunk:  # line numbers carried across pieces
        monkeypatch.setattr(inputs_module, "CHUNK_BYTES", chunk)
    good = [json.dumps({"text": f"doc {i}"}) for i in range(6)]
    lines = good[:2] + ['{"text": "cut off'] + good[2:4] + [json.dumps({"body": "x"})] + [json.dumps(["x"])] + good[4:]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError, match=rf"{path}:3: not valid JSON.*--skip-bad-lines"):
        prepare([str(path)], "byte", str(out / "c"), workers=0, max_skipped_fraction=0, progress="none")
    assert files_in(out) == []  # no output and no temporary file left
    result = prepare([str(path)], "byte", str(out / "c"), workers=0, max_skipped_fraction=1.0, progress="none")
    assert result.bad_count == 3 and [line for _, line, _ in result.bad] == [3, 6, 7]
    assert "no key 'text'" in result.bad[1][2] and "not an object" in result.bad[2][2]
    assert_documents(str(out / "c"), [f"doc {i}" for i in range(6)], ByteTokenizer())
    assert f"{path}:6: no key 'text'" in result.summary(np.dtype(np.uint16))


def test_bad_inputs_fail_before_work_and_name_what_is_wrong(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(DataError, match=f"input not found: {tmp_path / 'gone.jsonl'}"):
        prepare([str(good), str(tmp_path / "gone.jsonl")], "byte", str(tmp_path / "o"))
    with pytest.raises(DataError, match=rf"{good}:1: no key 'body' \(keys: \['text'\]\)"):
        prepare([str(good)], "byte", str(tmp_path / "o"), text_key="body")
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="cannot tell the format of .*notes.csv.*--format"):
        prepare([str(tmp_path / "notes.csv")], "byte", str(tmp_path / "o"))
    (tmp_path / "broken.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 100)[:-20])
    with pytest.raises(DataError, match="cannot decompress .*broken.jsonl.gz"):
        prepare([str(tmp_path / "broken.jsonl.gz")], "byte", str(tmp_path / "o"), workers=0)
    with pytest.raises(DataError, match="tokenizer file not found"):
        prepare([str(good)], str(tmp_path / "missing.json"), str(tmp_path / "o"))
    assert not any(name.startswith("o") for name in files_in(tmp_path))


def test_an_existing_output_is_refused_and_kept(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "hello"}) + "\n")
    prepare([str(path)], "byte", str(tmp_path / "c"), workers=0, progress="none")
    before = {n: (tmp_path / n).read_bytes() for n in ("c.bin", "c.idx")}
    path.write_text(json.dumps({"text": "other"}) + "\n")
    with pytest.raises(DataError, match=f"output {tmp_path / 'c.bin'} already exists"):
        prepare([str(path)], "byte", str(tmp_path / "c"), workers=0)
    assert {n: (tmp_path / n).read_bytes() for n in ("c.bin", "c.idx")} == before


def test_an_interrupted_prepare_leaves_nothing_train_would_take(tmp_path, monkeypatch):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(500)))
    monkeypatch.setattr(inputs_module, "CHUNK_BYTES", 500)
    calls = []
    real_add = IndexedWriter.add

    def interrupted(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_add(self, *args)

    monkeypatch.setattr(IndexedWriter, "add", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare([str(path)], "byte", str(out / "c"), workers=0, progress="none")
    assert files_in(out) == []
    monkeypatch.setattr(IndexedWriter, "add", real_add)
    # A killed run (no chance to clean up) leaves only temporary names, which no reader takes
    # for data and the next prepare of the prefix removes.
    dead = 2**22 + 12345  # above the default pid_max: no such process
    for name in ("c.bin", "c.idx", "c.lengths"):
        (out / f"{name}.partial-{dead}").write_bytes(b"\0" * 64)
    with pytest.raises(DataError, match="not found"):
        megatron_prefixes([str(out / "c")])
    prepare([str(path)], "byte", str(out / "c"), workers=0, progress="none")
    assert files_in(out) == ["c.bin", "c.idx"]
