"""Data sources: a DataConfig becomes one token stream plus where each document starts.

Packing needs the document boundaries (for `doc_ids`), so every source returns a
`Documents`: a token array [N] and the sorted start offset of each document [D].

- stdlib: Python's own sources, tokenized in memory (small, for tests and demos).
- text, jsonl, parquet, hf: tokenized once into the cache (`cache.tokenized_prefix`,
  which streams), then read like Megatron data; malformed records are skipped, counted
  per input, and checked against data.max_skipped_fraction on every run.
- megatron: .bin/.idx prefixes (or folders of them) read as memory maps; several
  prefixes read as one stream without copying (`tokens.ConcatTokens`).

Every path is resolved and checked (exists, not empty, globs match) before any file is
read, so a typo in the tenth path fails in milliseconds, not after the first nine load.
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass, field

import numpy as np

from sparsetron.train.config import DataConfig
from sparsetron.train.data.cache import cached_tallies, tokenized_prefix
from sparsetron.train.data.errors import DataError
from sparsetron.train.data.indexed import megatron_prefixes, read_indexed
from sparsetron.train.data.skipped import Tally, check_tallies
from sparsetron.train.data.tokenizer import TokenizerLike, token_dtype
from sparsetron.train.data.tokens import concat_tokens

__all__ = ["Documents", "load_documents", "megatron_documents", "stdlib_files"]

# Sources read from text that train tokenizes itself (into the cache).
TOKENIZED_AT_TRAIN = ("text", "jsonl", "parquet", "hf")

# Folders under the stdlib root that hold installed packages (or bytecode), not the stdlib.
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclass
class Documents:
    """A token stream and its document boundaries.

    tokens: [N] ids (uint16 when the vocabulary fits, else int32; Megatron data keeps
    its file's dtype and may be a read-only memmap). doc_starts: [D] int64, strictly
    increasing, doc_starts[0] == 0, every document non-empty.
    """

    tokens: np.ndarray
    doc_starts: np.ndarray
    source: str
    tallies: list[Tally] = field(default_factory=list)
    """Each input's records read and skipped (sources tokenized at train time; [] otherwise)."""

    @property
    def n_documents(self) -> int:
        return len(self.doc_starts)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


def load_documents(cfg: DataConfig, tokenizer: TokenizerLike, paths: list[str] | None = None) -> Documents:
    """The documents of `paths` (default cfg.paths) in cfg.source's format, at most cfg.max_documents."""
    limit = cfg.max_documents or None
    if cfg.source == "stdlib":
        texts = _stdlib_texts(cfg.seed, limit)
        tokens, starts = tokenizer.encode_documents(texts)
        return Documents(tokens, starts, f"stdlib ({sysconfig.get_paths()['stdlib']})")
    paths = cfg.paths if paths is None else paths
    if cfg.source == "megatron":
        return megatron_documents(paths, tokenizer, limit)
    if cfg.source in TOKENIZED_AT_TRAIN:
        if not paths:
            raise DataError("data.paths is empty: name at least one file or glob")
        prefix = tokenized_prefix(
            paths,
            cfg.source,
            cfg.text_key,
            tokenizer,
            cfg.max_documents,
            cfg.cache_dir,
            cfg.max_tokenize_gb,
            text_documents=cfg.text_documents,
        )
        tallies = cached_tallies(prefix)
        check_tallies(tallies, cfg.max_skipped_fraction, "data.max_skipped_fraction")
        tokens, starts = read_indexed(prefix, None)
        return Documents(tokens, starts, f"{cfg.source} {paths} (tokenized in {prefix})", tallies)
    raise DataError(f"unknown data source '{cfg.source}'")


# ---------------------------------------------------------------- stdlib


def stdlib_files() -> tuple[str, list[str]]:
    """The stdlib root and its .py files as sorted relative paths (installed packages excluded)."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in STDLIB_EXCLUDED_DIRS]
        rel = os.path.relpath(folder, root)
        found.extend(os.path.normpath(os.path.join(rel, n)) for n in names if n.endswith(".py"))
    return root, sorted(found)


def _stdlib_texts(seed: int, limit: int | None) -> list[str]:
    """The stdlib's sources in a seeded order, so a held-out tail mixes many modules.

    Sorting first makes the order depend only on the seed and the Python version, not
    on the file system's listing order. Files that are not UTF-8 (a few test fixtures
    are deliberately broken) or are empty are skipped.
    """
    root, rel_paths = stdlib_files()
    if not rel_paths:
        raise DataError(f"no .py files under the stdlib folder {root}")
    order = np.random.default_rng(seed).permutation(len(rel_paths))
    texts = []
    for i in order.tolist():
        try:
            with open(os.path.join(root, rel_paths[i]), "rb") as f:
                text = f.read().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text:
            texts.append(text)
            if limit and len(texts) >= limit:
                break
    return texts


# ---------------------------------------------------------------- megatron


def megatron_documents(patterns: list[str], tokenizer: TokenizerLike, limit: int | None = None) -> Documents:
    """The documents of Megatron prefixes (globs and folders of them allowed), in order."""
    prefixes = megatron_prefixes(patterns)
    parts = []
    remaining = limit
    for prefix in prefixes:
        tokens, starts = read_indexed(prefix, remaining)
        if len(starts) == 0:
            continue
        # One pass over the file: the price of failing here rather than deep in an embedding lookup.
        hi = int(tokens.max())
        lo = int(tokens.min()) if np.issubdtype(tokens.dtype, np.signedinteger) else 0
        if hi >= tokenizer.vocab_size or lo < 0:
            raise DataError(
                f"{prefix}.bin holds token ids in [{lo}, {hi}], outside the tokenizer's "
                f"vocabulary [0, {tokenizer.vocab_size - 1}] (vocab_size {tokenizer.vocab_size})"
            )
        parts.append((tokens, starts))
        if remaining is not None:
            remaining -= len(starts)
            if remaining <= 0:
                break
    if not parts:
        raise DataError(f"megatron data {prefixes} holds no documents")
    offsets = np.cumsum([0] + [len(t) for t, _ in parts[:-1]])
    # Memory maps stay memory maps: the tokens are paged in as windows are read, never copied.
    tokens = concat_tokens([t for t, _ in parts], token_dtype(tokenizer.vocab_size))
    starts = np.concatenate([s + o for (_, s), o in zip(parts, offsets, strict=True)])
    return Documents(tokens, starts, f"megatron {prefixes}")
