"""benchmarks/prepare.py on a 1 MB corpus: every method writes the same tokens, and the table has its rows and columns."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_prepare", BENCHMARKS / "prepare.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_every_method_writes_the_same_tokens_and_the_table_has_its_rows(tmp_path):
    bench = load_benchmark()
    # A tiny BPE and no megatron-core (importing it alone takes ~8 s here); workers 0 and 1.
    argv = ["--mb", "1", "--vocab", "300", "--workers", "0", "1", "--no-megatron", "--folder", str(tmp_path)]
    table = bench.main(argv)
    assert (
        "| method | workers | tokenizer threads | MB/s | docs/s | tokens/s | x baseline 1 thread "
        "| x prepare 1 worker (ideal) | CPU s main + workers | peak main MB | peak per worker MB |"
    ) in table
    cells = [line.strip("| ").split(" | ") for line in table.splitlines() if line.startswith("| ")]
    all_cores = f"all ({len(os.sched_getaffinity(0))})"
    assert [row[:3] for row in cells[1:]] == [
        ["baseline", "-", "1"],
        ["baseline", "-", all_cores],
        ["sparsetron prepare", "0", all_cores],
        ["sparsetron prepare", "1", "1 each"],
    ]
    assert all(len(row) == 11 for row in cells)
    assert cells[1][6] == "1.00" and cells[4][7] == "1.00 (1)"  # the two references of the ratios
    assert "Every run's .bin and .idx are byte-identical to the first's" in table
    assert "command: python benchmarks/prepare.py --mb 1" in table
    # Outputs are removed after each run is checked; the corpus and tokenizer stay.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "tokenizer.json"]


def test_the_corpus_is_seeded_json_lines_with_non_ascii_text(tmp_path):
    bench = load_benchmark()
    size, docs = bench.write_corpus(tmp_path / "a.jsonl", 0.2, seed=3)
    bench.write_corpus(tmp_path / "b.jsonl", 0.2, seed=3)
    data = (tmp_path / "a.jsonl").read_bytes()
    assert data == (tmp_path / "b.jsonl").read_bytes()
    assert len(data) == size >= 200_000
    records = [json.loads(line) for line in data.splitlines()]
    assert [r["id"] for r in records] == list(range(docs))
    texts = [r["text"] for r in records]
    assert all(texts) and any(not t.isascii() for t in texts) and any("\n" in t for t in texts)


def test_a_different_token_stream_stops_the_benchmark():
    bench = load_benchmark()
    ref = {"documents": 10, "tokens": 100}
    bench.check_same("same", dict(ref), "ab" * 32, ("baseline", ref, "ab" * 32), "out")
    with pytest.raises(RuntimeError, match="prepare wrote a different token stream than baseline"):
        bench.check_same("prepare", dict(ref), "cd" * 32, ("baseline", ref, "ab" * 32), "out")
    with pytest.raises(RuntimeError, match="different token stream"):
        bench.check_same("prepare", {"documents": 10, "tokens": 99}, "ab" * 32, ("baseline", ref, "ab" * 32), "out")
