"""Text sources at train time: tokenized once into a cache keyed by content, shared by
concurrent ranks, refused above data.max_tokenize_gb with the prepare command to run."""

from __future__ import annotations

import json
import shlex
import threading
import time

import numpy as np
import pytest

from sparsetron.train.config import DataConfig
from sparsetron.train.data import ByteTokenizer, DataError, load_documents
from sparsetron.train.data import prepare as prepare_module
from sparsetron.train.data.cache import tokenized_prefix

BYTE = ByteTokenizer()


@pytest.fixture
def counted(monkeypatch):
    """Counts the calls of `prepare` (the cache imports it when it must tokenize)."""
    calls = []
    real = prepare_module.prepare

    def counting(*args, **kwargs):
        calls.append(args[0])
        time.sleep(0.2)  # long enough for a concurrent caller to arrive while this one works
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "prepare", counting)
    return calls


def write(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))


def test_a_second_run_reads_the_cache_and_an_edit_retokenizes(tmp_path, counted):
    path = tmp_path / "c.jsonl"
    write(path, ["first doc", "second doc"])
    cfg = DataConfig(source="jsonl", paths=[str(path)], cache_dir=str(tmp_path / "cache"))
    first = load_documents(cfg, BYTE)
    again = load_documents(cfg, BYTE)
    assert len(counted) == 1
    assert np.array_equal(first.tokens, again.tokens) and BYTE.decode(again.tokens) == "first docsecond doc"
    write(path, ["first doc", "an edited second doc"])
    edited = load_documents(cfg, BYTE)
    assert len(counted) == 2 and BYTE.decode(edited.tokens) == "first docan edited second doc"
    cfg.max_documents = 1
    assert BYTE.decode(load_documents(cfg, BYTE).tokens) == "first doc" and len(counted) == 3


def test_concurrent_ranks_tokenize_once(tmp_path, counted):
    path = tmp_path / "c.jsonl"
    write(path, [f"doc {i}" for i in range(50)])
    prefixes, errors = [], []

    def rank():
        try:
            prefixes.append(tokenized_prefix([str(path)], "jsonl", "text", BYTE, 0, str(tmp_path / "cache"), 1.0))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=rank) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(set(prefixes)) == 1 and len(prefixes) == 3
    assert len(counted) == 1


def test_a_half_written_entry_is_rebuilt(tmp_path, counted):
    path = tmp_path / "c.jsonl"
    write(path, ["a doc"])
    prefix = tokenized_prefix([str(path)], "jsonl", "text", BYTE, 0, str(tmp_path / "cache"), 1.0)
    (tmp_path / "cache" / f"{prefix}.idx").unlink()  # killed between the renames of .bin and .idx
    assert tokenized_prefix([str(path)], "jsonl", "text", BYTE, 0, str(tmp_path / "cache"), 1.0) == prefix
    assert len(counted) == 2


def test_a_corpus_above_the_limit_is_refused_with_the_prepare_command(tmp_path, counted):
    path = tmp_path / "big corpus.jsonl"
    write(path, ["x" * 5000])
    cfg = DataConfig(source="jsonl", paths=[str(path)], cache_dir=str(tmp_path / "cache"), max_tokenize_gb=1e-6)
    with pytest.raises(DataError, match="more than data.max_tokenize_gb") as err:
        load_documents(cfg, BYTE)
    command = next(line for line in str(err.value).splitlines() if "sparsetron prepare" in line)
    assert shlex.split(command)[:4] == ["sparsetron", "prepare", "--input", str(path)]
    assert not counted
