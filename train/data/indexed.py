"""Megatron's indexed format: write a .bin/.idx pair in bounded memory, and read one back.

A prefix P names two files. P.bin holds every token back to back; P.idx holds a fixed
header (magic, version 1, dtype code, sequence count, document count), then each
sequence's length (int32), each sequence's byte offset in P.bin (int64), and the
sequence index where each document starts, plus a final end (int64). Here every
document is one sequence, as megatron-core's builder writes a document added whole.

The writer fills files under temporary names (`P.bin.partial-<pid>`, ...) and renames
them when complete, the .idx last: an interrupted or failed write leaves no pair that
a reader (or a glob over `*.idx`) would take for data. Lengths are spilled to a
temporary file as they come, so a corpus of billions of documents costs no memory.
"""

from __future__ import annotations

import glob
import os
import struct
import warnings

import numpy as np

from sparsetron.train.data.errors import DataError

__all__ = ["IndexedWriter", "check_file", "existing_outputs", "megatron_prefixes", "read_indexed"]

# The first bytes of every megatron-core .idx file, and the only version it writes.
IDX_MAGIC = b"MMIDIDX\x00\x00"
IDX_VERSION = 1
HEADER_BYTES = len(IDX_MAGIC) + 8 + 1 + 8 + 8
# megatron.core.datasets.indexed_dataset.DType codes.
DTYPE_CODES = {
    np.dtype(np.uint8): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.float64): 6,
    np.dtype(np.float32): 7,
    np.dtype(np.uint16): 8,
}
PARTIAL = ".partial-"
# Entries per read or write when the index is streamed: 8 MB of int64.
STREAM_ENTRIES = 1 << 20
MAX_DOC_TOKENS = (1 << 31) - 1  # lengths are int32 on disk


def check_file(path: str) -> None:
    if not os.path.exists(path):
        raise DataError(f"data file not found: {path}")
    if not os.path.isfile(path):
        raise DataError(f"data path is not a file: {path} (use a glob such as {os.path.join(path, '*')})")
    if os.path.getsize(path) == 0:
        raise DataError(f"data file is empty: {path}")


def existing_outputs(prefix: str) -> list[str]:
    """The files of `prefix` already on disk (which a new write must not replace)."""
    return [p for p in (prefix + ".bin", prefix + ".idx") if os.path.exists(p)]


class IndexedWriter:
    """Appends documents to a new .bin/.idx pair; `commit` publishes it, `abort` removes it.

    Use as a context manager: leaving the block by an exception aborts. Documents arrive
    as a token array [N] and their lengths [D] (sum = N); `continues` says the first
    length extends the previous call's last document (a text file read in pieces).
    """

    def __init__(self, prefix: str, dtype: np.dtype):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise DataError(f"cannot write tokens of dtype {self.dtype} in Megatron's indexed format")
        taken = existing_outputs(prefix)
        if taken:
            raise DataError(f"output {taken[0]} already exists; remove it or choose another prefix")
        folder = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(folder, exist_ok=True)
        tag = f"{PARTIAL}{os.getpid()}"
        self._paths = {name: f"{prefix}.{name}{tag}" for name in ("bin", "idx", "lengths")}
        self._bin = open(self._paths["bin"], "wb")
        self._lengths = open(self._paths["lengths"], "wb")
        self._last = -1  # length of the newest document, held back while it may still grow
        self.n_documents = 0
        self.n_tokens = 0
        self._done = False

    def __enter__(self) -> IndexedWriter:
        return self

    def __exit__(self, kind, value, tb) -> None:
        if not self._done:
            self.abort()

    def add(self, tokens: np.ndarray, lengths: np.ndarray, continues: bool = False) -> None:
        lengths = np.asarray(lengths, dtype=np.int64)
        if len(lengths) == 0:
            return
        if int(lengths.sum()) != len(tokens):
            raise ValueError(f"lengths sum to {int(lengths.sum())}, tokens hold {len(tokens)}")
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).data)
        self.n_tokens += len(tokens)
        if continues and self._last >= 0:
            lengths = lengths.copy()
            lengths[0] += self._last
        elif self._last >= 0:
            lengths = np.concatenate(([self._last], lengths))
        if int(lengths.max()) > MAX_DOC_TOKENS:
            raise DataError(f"a document of {int(lengths.max())} tokens does not fit Megatron's int32 lengths")
        self._lengths.write(lengths[:-1].astype(np.int32).data)
        self._last = int(lengths[-1])

    def commit(self) -> tuple[str, str]:
        """Write the index and rename both files to their final names."""
        if self._last >= 0:
            self._lengths.write(np.array([self._last], dtype=np.int32).data)
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        self._lengths.close()
        n_docs = os.path.getsize(self._paths["lengths"]) // 4
        self.n_documents = n_docs
        with open(self._paths["lengths"], "rb") as lengths, open(self._paths["idx"], "wb") as idx:
            idx.write(IDX_MAGIC)
            idx.write(struct.pack("<Q", IDX_VERSION))
            idx.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
            idx.write(struct.pack("<Q", n_docs))
            idx.write(struct.pack("<Q", n_docs + 1))
            while chunk := lengths.read(STREAM_ENTRIES * 4):
                idx.write(chunk)
            # Byte offset of each sequence: a running sum of lengths, chunk by chunk.
            lengths.seek(0)
            offset = 0
            while chunk := lengths.read(STREAM_ENTRIES * 4):
                ends = np.cumsum(np.frombuffer(chunk, dtype=np.int32), dtype=np.int64) * self.dtype.itemsize
                idx.write(_starts(ends, offset).data)
                offset += int(ends[-1])
            for lo in range(0, n_docs + 1, STREAM_ENTRIES):
                idx.write(np.arange(lo, min(lo + STREAM_ENTRIES, n_docs + 1), dtype=np.int64).data)
            idx.flush()
            os.fsync(idx.fileno())
        os.remove(self._paths["lengths"])
        os.replace(self._paths["bin"], self.prefix + ".bin")
        os.replace(self._paths["idx"], self.prefix + ".idx")
        self._done = True
        return self.prefix + ".bin", self.prefix + ".idx"

    def abort(self) -> None:
        """Close and remove every temporary file; nothing under the final names is touched."""
        for f in (self._bin, self._lengths):
            f.close()
        for path in self._paths.values():
            if os.path.exists(path):
                os.remove(path)
        self._done = True


def _starts(ends: np.ndarray, offset: int) -> np.ndarray:
    """Start offsets from end offsets of one chunk, shifted by everything before it."""
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1]
    return starts + offset


# ---------------------------------------------------------------- reading


def megatron_prefixes(patterns: list[str]) -> list[str]:
    """Path prefixes of .bin/.idx pairs, in order.

    A pattern is a prefix (a given .bin/.idx suffix is dropped), a glob matched against
    the .idx files, or a folder: every pair in it, sorted (what `prepare --per-file` writes).
    """
    if not patterns:
        raise DataError("data.paths is empty: name at least one .bin/.idx prefix")
    prefixes: list[str] = []
    for pattern in patterns:
        base = pattern[:-4] if pattern.endswith((".bin", ".idx")) else pattern
        if os.path.isdir(base):
            matches = sorted(glob.glob(os.path.join(glob.escape(base), "*.idx")))
            if not matches:
                raise DataError(f"megatron data folder {base} holds no .idx file")
            prefixes.extend(m[:-4] for m in matches)
        elif glob.has_magic(base):
            matches = sorted(glob.glob(base + ".idx", recursive=True))
            if not matches:
                raise DataError(f"megatron path glob '{base}.idx' matches no file")
            prefixes.extend(m[:-4] for m in matches)
        else:
            prefixes.append(base)
    for prefix in prefixes:
        check_file(prefix + ".idx")
        check_file(prefix + ".bin")
    return prefixes


def _check_index_header(idx_path: str) -> None:
    """Reject a corrupt or truncated .idx before megatron-core reads it.

    megatron-core reports these with bare asserts (and noisy destructor errors);
    its fixed header is: magic (9 bytes), version (u64), dtype code (u8), sequence
    count (u64), document count (u64), then i32 lengths, i64 pointers, i64 documents.
    """
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[:9] != IDX_MAGIC or struct.unpack("<Q", head[9:17])[0] != IDX_VERSION:
        raise DataError(f"cannot read megatron index {idx_path}: not a version-1 MMIDIDX index file")
    n_seq, n_doc = struct.unpack("<QQ", head[18:34])
    need = HEADER_BYTES + n_seq * (4 + 8) + n_doc * 8
    if size < need:
        raise DataError(
            f"cannot read megatron index {idx_path}: it describes {n_seq} sequences and {n_doc - 1} "
            f"documents ({need} bytes) but holds {size} bytes"
        )


def read_indexed(prefix: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
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
