"""Data sources: a DataConfig becomes one token stream plus where each document starts.

Packing needs the document boundaries (for `doc_ids`), so every source returns a
`Documents`: a flat token array [N] and the sorted start offset of each document [D].
Text sources append the tokenizer's eos to every document; Megatron data is already
tokenized and is taken as it is on disk.

Every path is resolved and checked (exists, not empty, globs match) before any file is
read, so a typo in the tenth path fails in milliseconds, not after the first nine load.
"""

from __future__ import annotations

import glob
import os
import struct
import sysconfig
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from sparsetron.train.config import DataConfig
from sparsetron.train.data.errors import DataError
from sparsetron.train.data.tokenizer import TokenizerLike, token_dtype

__all__ = ["Documents", "load_documents", "stdlib_files"]

# The first bytes of every megatron-core .idx file.
IDX_MAGIC = b"MMIDIDX\x00\x00"

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

    @property
    def n_documents(self) -> int:
        return len(self.doc_starts)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


def load_documents(cfg: DataConfig, tokenizer: TokenizerLike) -> Documents:
    """Read and tokenize the documents `cfg` names (at most cfg.max_documents of them)."""
    limit = cfg.max_documents or None
    if cfg.source == "stdlib":
        texts = _stdlib_texts(cfg.seed, limit)
        label = f"stdlib ({sysconfig.get_paths()['stdlib']})"
    elif cfg.source == "megatron":
        return _megatron_documents(_megatron_prefixes(cfg.paths), tokenizer, limit)
    elif cfg.source == "text":
        files = _resolve_files(cfg.paths)
        texts = _text_files(files[:limit] if limit else files)
        label = f"text {cfg.paths}"
    elif cfg.source in ("jsonl", "parquet"):
        files = _resolve_files(cfg.paths)
        builder = "json" if cfg.source == "jsonl" else "parquet"
        texts = _table_texts(files, builder, cfg.text_key, limit)
        label = f"{cfg.source} {cfg.paths}"
    else:
        raise DataError(f"unknown data source '{cfg.source}'")
    if not texts:
        raise DataError(f"{label} holds no documents")
    tokens, starts = tokenizer.encode_documents(texts)
    return Documents(tokens, starts, label)


# ---------------------------------------------------------------- path handling


def _resolve_files(patterns: list[str]) -> list[str]:
    """Expand globs (each sorted) and check every file exists and is not empty."""
    if not patterns:
        raise DataError("data.paths is empty: name at least one file or glob")
    files: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"data path glob '{pattern}' matches no file")
            files.extend(matches)
        else:
            files.append(pattern)
    for f in files:
        _check_file(f)
    return files


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise DataError(f"data file not found: {path}")
    if not os.path.isfile(path):
        raise DataError(f"data path is not a file: {path} (use a glob such as {os.path.join(path, '*')})")
    if os.path.getsize(path) == 0:
        raise DataError(f"data file is empty: {path}")


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


# ---------------------------------------------------------------- text files


def _text_files(files: list[str]) -> list[str]:
    texts = []
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"text file is not UTF-8: {path} ({e})") from e
    return texts


# ---------------------------------------------------------------- jsonl / parquet


@contextmanager
def _offline_datasets() -> Iterator:
    """`datasets`, forced offline and quiet for the duration, restored afterwards.

    The flags are switched on the library's config rather than in os.environ, which
    `datasets` reads only once at import and which would leak into the whole process.
    """
    import datasets

    saved = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)
    bars = datasets.is_progress_bar_enabled()
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved
        if bars:
            datasets.enable_progress_bars()


def _load_table(datasets, builder: str, files: list[str], cache: str):
    return datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache)


def _table_texts(files: list[str], builder: str, key: str, limit: int | None) -> list[str]:
    """The `key` column of jsonl/parquet files, in file order, via `datasets`.

    All files load in one call (fast for many shards). When that fails (a bad file,
    or shards whose other columns disagree) they load one at a time, which names the
    file at fault or, if each is fine alone, still reads them. The Arrow cache lives in
    a temporary folder: nothing is left in ~/.cache and no hub is ever asked.
    """
    texts: list[str] = []
    with _offline_datasets() as datasets, tempfile.TemporaryDirectory(prefix="sparsetron-data-") as cache:
        try:
            tables = [(files, _load_table(datasets, builder, files, cache))]
        except Exception:
            tables = None
        if tables is None:
            tables = []
            for f in files:
                try:
                    tables.append(([f], _load_table(datasets, builder, [f], cache)))
                except Exception as e:
                    cause = f"{e}: {e.__cause__}" if e.__cause__ else str(e)
                    raise DataError(f"cannot read {builder} file {f}: {cause}") from e
        for names, table in tables:
            texts.extend(_column(table, key, names, None if limit is None else limit - len(texts)))
            if limit is not None and len(texts) >= limit:
                break
        del tables  # release the memory maps before the cache folder goes
    return texts


def _column(table, key: str, files: list[str], limit: int | None) -> list[str]:
    where = files[0] if len(files) == 1 else f"{files[0]} (and {len(files) - 1} more files)"
    if key not in table.column_names:
        raise DataError(f"column '{key}' not in {where} (columns: {table.column_names})")
    feature = table.features[key]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise DataError(f"column '{key}' of {where} holds {feature}, not text")
    # Rows with no text would become documents of a lone eos (pure noise): skip them,
    # reading in slices so a small limit never materializes a huge column.
    column = table.select_columns([key])
    out: list[str] = []
    lo = 0
    while lo < len(column) and (limit is None or len(out) < limit):
        hi = len(column) if limit is None else min(len(column), lo + max(limit - len(out), 1024))
        out.extend(t for t in column[lo:hi][key] if t)
        lo = hi
    return out if limit is None else out[:limit]


# ---------------------------------------------------------------- megatron


def _megatron_prefixes(patterns: list[str]) -> list[str]:
    """Path prefixes of .bin/.idx pairs; globs match the .idx files, a given suffix is dropped."""
    if not patterns:
        raise DataError("data.paths is empty: name at least one .bin/.idx prefix")
    prefixes: list[str] = []
    for pattern in patterns:
        base = pattern[:-4] if pattern.endswith((".bin", ".idx")) else pattern
        if glob.has_magic(base):
            matches = sorted(glob.glob(base + ".idx", recursive=True))
            if not matches:
                raise DataError(f"megatron path glob '{base}.idx' matches no file")
            prefixes.extend(m[:-4] for m in matches)
        else:
            prefixes.append(base)
    for prefix in prefixes:
        _check_file(prefix + ".idx")
        _check_file(prefix + ".bin")
    return prefixes


def _megatron_documents(prefixes: list[str], tokenizer: TokenizerLike, limit: int | None) -> Documents:
    parts = []
    remaining = limit
    for prefix in prefixes:
        tokens, starts = _read_indexed(prefix, remaining)
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
    label = f"megatron {prefixes}"
    if len(parts) == 1:
        # The memmap itself: the tokens are paged in as windows are read, never copied.
        return Documents(parts[0][0], parts[0][1], label)
    offsets = np.cumsum([0] + [len(t) for t, _ in parts[:-1]])
    tokens = np.concatenate([t for t, _ in parts]).astype(token_dtype(tokenizer.vocab_size), copy=False)
    starts = np.concatenate([s + o for (_, s), o in zip(parts, offsets, strict=True)])
    return Documents(tokens, starts, label)


def _check_index_header(idx_path: str) -> None:
    """Reject a corrupt or truncated .idx before megatron-core reads it.

    megatron-core reports these with bare asserts (and noisy destructor errors);
    its fixed header is: magic (9 bytes), version (u64), dtype code (u8), sequence
    count (u64), document count (u64), then i32 lengths, i64 pointers, i64 documents.
    """
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(34)
    if len(head) < 34 or head[:9] != IDX_MAGIC or struct.unpack("<Q", head[9:17])[0] != 1:
        raise DataError(f"cannot read megatron index {idx_path}: not a version-1 MMIDIDX index file")
    n_seq, n_doc = struct.unpack("<QQ", head[18:34])
    need = 34 + n_seq * (4 + 8) + n_doc * 8
    if size < need:
        raise DataError(
            f"cannot read megatron index {idx_path}: it describes {n_seq} sequences and {n_doc - 1} "
            f"documents ({need} bytes) but holds {size} bytes"
        )


def _read_indexed(prefix: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The tokens of one .bin (a memmap view) and its non-empty documents' starts."""
    with warnings.catch_warnings():
        # megatron.core warns at import about optional fused kernels we never use.
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset

    _check_index_header(prefix + ".idx")
    try:
        index = IndexedDataset(prefix, mmap=False).index
    except (AssertionError, ValueError, OSError, KeyError, struct.error) as e:
        raise DataError(f"cannot read megatron index {prefix}.idx: {e}") from e
    # Copies, not views: the index's memory map is closed when `index` is collected.
    dtype = np.dtype(index.dtype)
    lengths = np.array(index.sequence_lengths, dtype=np.int64)
    pointers = np.array(index.sequence_pointers, dtype=np.int64)
    doc_indices = np.array(index.document_indices, dtype=np.int64)
    del index
    seq_starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=seq_starts[1:])
    # Reading the .bin as one stream is only right when sequences sit back to back,
    # which is how megatron-core's builder (and its merge tool) write them.
    if not np.array_equal(pointers, seq_starts[:-1] * dtype.itemsize):
        raise DataError(f"{prefix}.bin: sequences are not stored back to back; this layout is not supported")
    bin_path = prefix + ".bin"
    n_total = int(seq_starts[-1])
    if os.path.getsize(bin_path) < n_total * dtype.itemsize:
        raise DataError(
            f"{bin_path} is truncated: the index describes {n_total} {dtype} tokens "
            f"({n_total * dtype.itemsize} bytes), the file has {os.path.getsize(bin_path)} bytes"
        )
    if doc_indices[0] != 0 or doc_indices[-1] != len(lengths) or np.any(np.diff(doc_indices) < 0):
        raise DataError(f"cannot read megatron index {prefix}.idx: its document indices are not a partition")
    bounds = seq_starts[doc_indices]  # [D+1] token offsets
    starts = bounds[:-1][np.diff(bounds) > 0]
    if limit is not None and len(starts) > limit:
        n_total = int(starts[limit])
        starts = starts[:limit]
    tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(n_total,)) if n_total else np.empty(0, dtype)
    # Empty documents lie before the first real one, so starts[0] is 0 whenever any is left.
    return tokens, starts
