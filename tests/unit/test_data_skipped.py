"""Records that yield no document at train time and in `prepare`: counted per file and reason,
reported, kept across a cache hit, and limited by data.max_skipped_fraction (--max-skipped-fraction)."""

from __future__ import annotations

import json
import random

import pytest

from sparsetron.launch.cli import main
from sparsetron.train.config import DataConfig
from sparsetron.train.data import ByteTokenizer, DataError, load_documents
from sparsetron.train.data import prepare as prepare_module
from sparsetron.train.data.cache import TALLIES_SUFFIX, tokenized_prefix
from sparsetron.train.data.skipped import skipped_lines

BYTE = ByteTokenizer()
BAD_ROWS = {
    "invalid JSON": lambda i: '{"text": "cut off',
    "not a JSON object": lambda i: json.dumps([i]),
    "missing key 'text'": lambda i: json.dumps({"body": f"row {i}"}),
    "text not a string": lambda i: json.dumps({"text": i}),
    "empty": lambda i: json.dumps({"text": random.choice(["", None])}),
}


def corpus(path, n_good: int, bad: dict[str, int], rng: random.Random) -> list[str]:
    """A jsonl file of n_good documents and bad[reason] rows of each kind, shuffled; its documents."""
    good = [f"doc {i} " + "x" * rng.randint(1, 30) for i in range(n_good)]
    rows = [json.dumps({"text": t, "id": i}) for i, t in enumerate(good)]
    rows += [BAD_ROWS[reason](i) for reason, n in bad.items() for i in range(n)]
    order = list(range(len(rows)))
    rng.shuffle(order)
    rows = [rows[0]] + [rows[i] for i in order if i != 0]  # a good first row: the key check passes
    path.write_text("\n".join(rows) + "\n")
    return [json.loads(r)["text"] for r in rows if r.startswith('{"text": "doc')]


@pytest.fixture
def prepare_calls(monkeypatch):
    calls = []
    real = prepare_module.prepare
    monkeypatch.setattr(prepare_module, "prepare", lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


def test_skipped_rows_are_counted_by_file_and_reason_and_survive_a_cache_hit(tmp_path, prepare_calls):
    rng = random.Random()
    bad = {reason: rng.randint(0, 3) for reason in BAD_ROWS}
    bad["missing key 'text'"] += 1
    n_good = rng.randint(60, 120)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    docs = corpus(a, n_good, bad, rng)
    corpus(b, 20, {}, rng)
    cfg = DataConfig(source="jsonl", paths=[str(a), str(b)], cache_dir=str(tmp_path / "cache"), max_skipped_fraction=1)
    first = load_documents(cfg, BYTE)
    again = load_documents(cfg, BYTE)
    assert len(prepare_calls) == 1  # the second read the cache entry
    for got in (first, again):
        assert [t.path for t in got.tallies] == [str(a), str(b)]
        ta, tb = got.tallies
        assert ta.skipped == {r: n for r, n in bad.items() if n}
        assert (ta.records, ta.documents) == (n_good + sum(bad.values()), n_good)
        assert (tb.records, tb.documents, tb.skipped) == (20, 20, {})
        assert got.n_documents == n_good + 20
    assert BYTE.decode(first.tokens[: first.doc_starts[n_good]]) == "".join(docs)
    lines = skipped_lines(first.tallies)
    total = sum(bad.values())
    assert lines[0].startswith(f"skipped {total} of {n_good + total + 20} records (")
    assert lines[1].startswith(f"  {a}: {total} of {n_good + total} records (")
    assert len(lines) == 2  # b skipped nothing and is not listed
    missing = bad["missing key 'text'"]
    assert f"{missing} missing key 'text'" in lines[1]


def test_the_share_of_malformed_rows_is_limited_per_file(tmp_path):
    rng = random.Random()
    path = tmp_path / "half.jsonl"
    n_bad = rng.randint(20, 40)
    corpus(path, 40, {"missing key 'text'": n_bad}, rng)
    cache = str(tmp_path / "cache")
    with pytest.raises(DataError) as err:
        load_documents(DataConfig(source="jsonl", paths=[str(path)], cache_dir=cache), BYTE)
    share = n_bad / (40 + n_bad)
    assert str(err.value).startswith(
        f"{path}: {n_bad} of {40 + n_bad} records malformed ({share:.1%}), more than data.max_skipped_fraction=0.05 "
        f"allows (skipped: {n_bad} missing key 'text'); the first, {path}:"
    )
    # The limit read from the cached tallies: raising it needs no new tokenization.
    allowed = DataConfig(source="jsonl", paths=[str(path)], cache_dir=cache, max_skipped_fraction=share)
    assert load_documents(allowed, BYTE).n_documents == 40
    # 0: any malformed row stops the run; empty ones never do.
    strict = tmp_path / "strict.jsonl"
    corpus(strict, 30, {"empty": 10, "text not a string": 1}, rng)
    with pytest.raises(DataError, match=rf"^{strict}: 1 of 41 records malformed .*max_skipped_fraction=0 allows"):
        load_documents(DataConfig(source="jsonl", paths=[str(strict)], cache_dir=cache, max_skipped_fraction=0), BYTE)
    corpus(strict, 30, {"empty": 10}, rng)
    assert load_documents(DataConfig(source="jsonl", paths=[str(strict)], cache_dir=cache), BYTE).n_documents == 30


def test_a_file_that_yields_no_document_is_named(tmp_path):
    good, bad = tmp_path / "good.jsonl", tmp_path / "wrong.jsonl"
    corpus(good, 30, {}, random.Random())
    bad.write_text("".join(json.dumps({"text": ""}) + "\n" for _ in range(3)) + json.dumps({"text": 7}) + "\n")
    cfg = DataConfig(source="jsonl", paths=[str(good), str(bad)], cache_dir=str(tmp_path / "c"), max_skipped_fraction=1)
    with pytest.raises(DataError) as err:
        load_documents(cfg, BYTE)
    assert str(err.value) == (
        f"{bad}: no documents in 4 records: 3 empty, 1 text not a string; "
        f"the first malformed, {bad}:4: 'text' holds a int, not text"
    )


def test_prepare_applies_the_same_limit(tmp_path, capsys):
    rng = random.Random()
    path = tmp_path / "c.jsonl"
    corpus(path, 45, {"invalid JSON": 5}, rng)
    args = ["prepare", "--input", str(path), "--tokenizer", "byte", "--workers", "0", "--progress", "none"]
    assert main([*args, "--out", str(tmp_path / "a"), "--max-skipped-fraction", "0.05"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        f"error: {path}: 5 of 50 records malformed (10.0%), more than --max-skipped-fraction=0.05 allows "
        "(skipped: 5 invalid JSON); the first,"
    )
    assert "\n" not in err and not list(tmp_path.glob("a.*"))
    assert main([*args, "--out", str(tmp_path / "b"), "--max-skipped-fraction", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and f"skipped 5 of 50 records (5 invalid JSON):\n  {path}: 5 of 50 records" in out
    # The default is train's: 10% malformed is too many.
    assert main([*args, "--out", str(tmp_path / "c")]) == 2
    assert "more than --max-skipped-fraction=0.05 allows" in capsys.readouterr().err
    # 0: the first malformed record stops it, named by its line.
    assert main([*args, "--out", str(tmp_path / "d"), "--max-skipped-fraction", "0"]) == 2
    err = capsys.readouterr().err
    assert f"error: {path}:" in err and "(--skip-bad-lines or --max-skipped-fraction skip such records)" in err


def test_an_entry_without_its_tallies_is_rebuilt(tmp_path, prepare_calls):
    path = tmp_path / "c.jsonl"
    corpus(path, 10, {"empty": 1}, random.Random())
    build = lambda: tokenized_prefix([str(path)], "jsonl", "text", BYTE, 0, str(tmp_path / "cache"), 1.0)  # noqa: E731
    prefix = build()
    (tmp_path / "cache" / f"{prefix}{TALLIES_SUFFIX}").unlink()  # killed before its tallies were written
    assert build() == prefix and len(prepare_calls) == 2
    assert (tmp_path / "cache" / f"{prefix}{TALLIES_SUFFIX}").exists()
