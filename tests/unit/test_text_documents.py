"""data.text_documents (prepare --text-documents): a text file as one document, one per paragraph,
or one per line, the same however the file is cut into pieces; a one-document text file says how to split it."""

from __future__ import annotations

import random

import numpy as np
import pytest

from sparsetron.launch.cli import main
from sparsetron.model.config import ConfigError
from sparsetron.train.config import DataConfig
from sparsetron.train.config_io import load_job_config, to_dict
from sparsetron.train.data import ByteTokenizer, DataError, build_training_data, load_documents
from sparsetron.train.data import inputs as inputs_module
from sparsetron.train.data.indexed import read_indexed
from sparsetron.train.resume import compare_with_checkpoint

BYTE = ByteTokenizer()


def paragraphs(rng: random.Random) -> tuple[str, list[str], list[str]]:
    """(file text, its paragraphs, its non-blank lines) with blank runs of spaces, tabs and CRLFs between them."""
    words = ["alpha", "beta", "é", "漢字", "x=1;", "(b)", "\ttab"]
    paras = []
    for _ in range(rng.randint(5, 25)):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 8))) for _ in range(rng.randint(1, 4))]
        paras.append(lines)
    text = rng.choice(["", "\n", "  \n"])
    for i, lines in enumerate(paras):
        text += "\n".join(lines)
        text += rng.choice(["\n\n", "\n \n", "\n\t\n\n", "\r\n\r\n"]) if i < len(paras) - 1 else rng.choice(["", "\n"])
    # A CRLF separator leaves a \r on the paragraph's last line: it is dropped like the separator.
    return text, ["\n".join(lines) for lines in paras], [line for lines in paras for line in lines]


def decoded(docs) -> list[str]:
    bounds = [*docs.doc_starts.tolist(), len(docs.tokens)]
    return [BYTE.decode(docs.tokens[a : b - 1]) for a, b in zip(bounds, bounds[1:], strict=False)]


@pytest.mark.parametrize("chunk", [None, 7], ids=["one-piece", "many-pieces"])
def test_paragraphs_and_lines_are_documents(tmp_path, chunk, monkeypatch):
    if chunk:  # pieces far smaller than a paragraph: every cut is exercised
        monkeypatch.setattr(inputs_module, "CHUNK_BYTES", chunk)
    text, paras, lines = paragraphs(random.Random())
    path = tmp_path / "book.txt"
    path.write_bytes(text.encode())
    cache = str(tmp_path / "cache")
    for mode, want in (("paragraph", paras), ("line", lines)):
        docs = load_documents(DataConfig(source="text", paths=[str(path)], text_documents=mode, cache_dir=cache), BYTE)
        assert decoded(docs) == want, mode
        assert docs.tallies[0].documents == len(want) and docs.tallies[0].skipped == {}
    whole = load_documents(DataConfig(source="text", paths=[str(path)], cache_dir=cache), BYTE)
    assert whole.n_documents == 1 and BYTE.decode(whole.tokens[:-1]) == text


def test_one_text_file_says_how_to_split_it(tmp_path):
    path = tmp_path / "notes.txt"
    text, paras, _ = paragraphs(random.Random())
    path.write_text(text * 40)
    base = [
        "data.source=text",
        f"data.paths=[{path}]",
        f"data.cache_dir={tmp_path / 'c'}",
        "data.seq_len=16",
        "data.max_documents=0",
    ]
    with pytest.raises(DataError) as err:
        build_training_data(load_job_config("debug-dense", base).data, BYTE, 2, 1)
    assert str(err.value) == (
        "need at least 2 documents to split off validation data, got 1: a text file is one document; "
        "set data.text_documents=paragraph or line to split it (or name validation files in data.val_paths)"
    )
    job = load_job_config("debug-dense", [*base, "data.text_documents=paragraph"])
    data = build_training_data(job.data, BYTE, 2, 1)
    # Copies run together where the text neither starts nor ends with a blank line.
    assert len(paras) * 40 - 39 <= data.train[0].n_documents + data.sources[0].val.n_documents <= len(paras) * 40


def test_the_cli_splits_the_same_way(tmp_path):
    text, _, lines = paragraphs(random.Random())
    path = tmp_path / "book.txt"
    path.write_text(text)
    base = ["prepare", "--input", str(path), "--tokenizer", "byte", "--workers", "0", "--progress", "none"]
    assert main([*base, "--out", str(tmp_path / "lines"), "--text-documents", "line"]) == 0
    tokens, starts = read_indexed(str(tmp_path / "lines"), None)
    assert len(starts) == len(lines) and np.array_equal(tokens[starts], [line.encode()[0] for line in lines])


def test_text_documents_fixes_the_data_position(tmp_path):
    saved = to_dict(load_job_config("debug-dense", ["data.source=text", "data.paths=[a.txt]"]))
    job = load_job_config("debug-dense", ["data.source=text", "data.paths=[a.txt]", "data.text_documents=line"])
    with pytest.raises(
        ConfigError, match=r"data\.text_documents: checkpoint 'file', config 'line' \(fixes the saved data position\)"
    ):
        compare_with_checkpoint(job, saved, tmp_path)
