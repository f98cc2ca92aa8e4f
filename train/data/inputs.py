"""Corpus files for `prepare`: each input's format, and the pieces it is read in.

Formats: `text` (a file is one document, or each paragraph or line is: TEXT_DOCUMENTS), `jsonl` (one JSON object per line, the text
under a key; also .gz and .zst), `parquet` (a string column), and `hf` (a Hugging Face
dataset saved with `save_to_disk`: a folder of Arrow stream files). Every input is
resolved and cheaply checked (exists, not empty, holds the key) before any is read.

Reading is split in two so that it streams and parallelizes: the main process cuts
each input into tasks of about CHUNK_BYTES (raw lines, a parquet row group, a slice of
an Arrow column), and a worker turns a task into a `Piece` of tokens with `run_task`.
A task carries its file and first line (or row), so a bad record is named exactly,
and a piece counts its records and the ones it skipped by reason (`skipped.Tally`).
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import resource
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from sparsetron.train.data.errors import DataError
from sparsetron.train.data.indexed import check_file
from sparsetron.train.data.skipped import EMPTY
from sparsetron.train.data.tokenizer import TokenizerLike

__all__ = [
    "FORMATS",
    "TEXT_DOCUMENTS",
    "Input",
    "Piece",
    "check_input",
    "output_name",
    "peak_rss_mb",
    "read_tasks",
    "resolve_inputs",
    "run_task",
]

FORMATS = ("text", "jsonl", "parquet", "hf")
# How a text file splits into documents: whole, at blank lines, or one per non-blank line.
TEXT_DOCUMENTS = ("file", "paragraph", "line")
# A line of nothing but whitespace between two newlines: where paragraph mode may cut a file.
BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")
CHUNK_BYTES = 4 << 20
# A text file is cut only at a newline between two visible ASCII characters ("a\nb"): there
# byte-level tokenizers (GPT-2's and Llama 3's pre-tokenizer rules) split anyway, so the
# pieces tokenize exactly as the whole file would. (Next to whitespace a cut is not safe: a
# run of spaces at a piece's end would become one pre-token.) A file with no such point in
# MAX_TEXT_PIECE bytes is cut at its last newline.
MAX_TEXT_PIECE = 16 * CHUNK_BYTES
VISIBLE_ASCII = frozenset(range(0x21, 0x7F))
COMPRESSIONS = (".gz", ".zst")
SUFFIXES = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
    ".md": "text",
}


@dataclass(frozen=True)
class Input:
    """One input: a file, or an `hf` folder with its Arrow files."""

    path: str
    format: str
    files: tuple[str, ...]
    size: int
    """Bytes on disk (what progress and MB/s count)."""


@dataclass
class Piece:
    """A worker's answer to one task.

    tokens [N] and lengths [D] (each document with its eos, sum = N); `continues` says
    the first length extends the previous piece's last document.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    continues: bool = False
    open_end: bool = False
    """The last document goes on in the next piece (a text file read in pieces)."""
    n_bytes: int = 0
    records: int = 0
    """Records read: lines of jsonl and text, rows of parquet and hf."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Records skipped, by reason (skipped.EMPTY or a malformation)."""
    bad: list[tuple[str, int, str]] = field(default_factory=list)
    """(file, line or row, what is wrong) of each record skipped as malformed."""
    peak_rss_mb: float = 0.0
    """The worker's peak resident memory so far (0 when tokenized in the main process)."""

    def skip(self, reason: str, n: int = 1) -> None:
        if n:
            self.skipped[reason] = self.skipped.get(reason, 0) + n

    def malformed(self, reason: str, path: str, line: int, why: str) -> None:
        self.skip(reason)
        self.bad.append((path, line, why))


# ---------------------------------------------------------------- resolving


def _format_of(path: str) -> str | None:
    if os.path.isdir(path):
        return "hf"
    name = path.lower()
    for ext in COMPRESSIONS:
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return SUFFIXES.get(os.path.splitext(name)[1])


def output_name(path: str) -> str:
    """An input's name without folder and format suffixes (`a/b.jsonl.gz` -> `b`)."""
    name = os.path.basename(os.path.normpath(path))
    lower = name.lower()
    for ext in COMPRESSIONS:
        if lower.endswith(ext):
            name, lower = name[: -len(ext)], lower[: -len(ext)]
            break
    stem, ext = os.path.splitext(name)
    return stem if ext.lower() in SUFFIXES else name


def _hf_files(folder: str) -> tuple[str, ...]:
    if os.path.isfile(os.path.join(folder, "dataset_dict.json")):
        splits = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
        raise DataError(
            f"{folder} holds a DatasetDict with splits {splits}: name one split's folder, "
            f"such as {os.path.join(folder, splits[0] if splits else 'train')}"
        )
    state_file = os.path.join(folder, "state.json")
    if not os.path.isfile(state_file):
        raise DataError(
            f"{folder} is a folder but not a Hugging Face dataset saved with save_to_disk "
            f"(no state.json); for the files in it use a glob such as {os.path.join(folder, '*.jsonl')}"
        )
    try:
        with open(state_file, encoding="utf-8") as f:
            names = [entry["filename"] for entry in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"cannot read {state_file}: {e!r}") from e
    files = tuple(os.path.join(folder, n) for n in names)
    for path in files:
        check_file(path)
    return files


def resolve_inputs(patterns: list[str], fmt: str = "auto") -> list[Input]:
    """Expand globs (each sorted), check every input, and find each one's format."""
    if not patterns:
        raise DataError("no input named: give at least one file, glob or dataset folder")
    if fmt not in ("auto", *FORMATS):
        raise DataError(f"unknown input format '{fmt}' (choose from auto, {', '.join(FORMATS)})")
    paths: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise DataError(f"input glob '{pattern}' matches no file")
            paths.extend(matches)
        else:
            paths.append(pattern)
    inputs = []
    for path in paths:
        if not os.path.exists(path):
            raise DataError(f"input not found: {path}")
        found = fmt if fmt != "auto" else _format_of(path)
        if found is None:
            known = ", ".join(sorted(SUFFIXES))
            raise DataError(
                f"cannot tell the format of {path} from its name (known: {known}, each also .gz or .zst, "
                "or a saved Hugging Face dataset folder); name it with --format"
            )
        if found == "hf":
            if not os.path.isdir(path):
                raise DataError(f"{path} is not a folder; a Hugging Face dataset saved to disk is one")
            files = _hf_files(path)
        else:
            check_file(path)
            files = (path,)
        inputs.append(Input(path, found, files, sum(os.path.getsize(f) for f in files)))
    return inputs


# ---------------------------------------------------------------- cheap checks


def _string_column(schema, key: str, where: str) -> None:
    import pyarrow as pa

    if key not in schema.names:
        raise DataError(
            f"{where} has no column '{key}' (columns: {schema.names}); choose one with --text-key (data.text_key in train)"
        )
    kind = schema.field(key).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"column '{key}' of {where} holds {kind}, not text")


def check_input(item: Input, key: str) -> None:
    """Fail now, not hours in, when an input cannot hold `key`'s text."""
    if item.format == "jsonl":
        number, line = _first_record(item.path)
        try:
            record = json.loads(line)
        except ValueError:
            return  # a malformed line is reported (or skipped) where it is read
        if isinstance(record, dict) and key not in record:
            raise DataError(
                f"{item.path}:{number}: no key '{key}' (keys: {sorted(record)}); choose one with --text-key (data.text_key in train)"
            )
    elif item.format == "parquet":
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(item.path)
        except Exception as e:  # pyarrow raises ArrowInvalid and OSError subclasses
            raise DataError(f"cannot read parquet file {item.path}: {e}") from e
        _string_column(schema, key, item.path)
    elif item.format == "hf":
        for path in item.files:
            with _open_arrow(path) as reader:
                _string_column(reader.schema, key, path)


def _first_record(path: str) -> tuple[int, bytes]:
    """The first line that is not blank, and its number ((0, b"") if there is none)."""
    data = b""
    for block, _ in _blocks(path):
        data += block
        number = 1
        for line in data.split(b"\n")[:-1]:
            if line.strip():
                return number, line
            number += 1
    return 0, data


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started (or exec'd) in MB.

    Linux's VmHWM, not getrusage: ru_maxrss survives exec, so a worker spawned by a
    big parent would report the parent's peak as its own.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _open_arrow(path: str):
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(pa.OSFile(path, "rb"))
    except Exception as e:
        raise DataError(f"cannot read Arrow file {path}: {e}") from e


# ---------------------------------------------------------------- tasks (main process)


@dataclass
class JsonlTask:
    path: str
    first_line: int
    data: bytes
    n_bytes: int


@dataclass
class TextTask:
    path: str
    first_line: int
    data: bytes
    first: bool
    last: bool
    n_bytes: int
    documents: str = "file"
    """TEXT_DOCUMENTS: with paragraph and line the task holds whole documents."""


@dataclass
class ParquetTask:
    path: str
    group: int
    first_row: int
    n_bytes: int


@dataclass
class ArrowTask:
    path: str
    first_row: int
    column: object  # a pyarrow string array: pickled as its buffers
    n_bytes: int


def read_tasks(
    item: Input, key: str, text_documents: str = "file"
) -> Iterator[JsonlTask | TextTask | ParquetTask | ArrowTask]:
    if item.format == "jsonl":
        yield from _jsonl_tasks(item.path)
    elif item.format == "text":
        yield from _text_tasks(item.path, text_documents)
    elif item.format == "parquet":
        yield from _parquet_tasks(item.path)
    else:
        for path in item.files:
            yield from _arrow_tasks(path, key)


class _CountingReader:
    """Counts the bytes read from disk under a decompressor, for progress."""

    def __init__(self, path: str):
        self.raw = open(path, "rb")
        self.consumed = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.consumed += len(data)
        return data

    def close(self) -> None:
        self.raw.close()


def _blocks(path: str) -> Iterator[tuple[bytes, int]]:
    """(decompressed block, bytes newly read from disk) until the file ends."""
    raw = _CountingReader(path)
    try:
        if path.endswith(".gz"):
            stream = gzip.GzipFile(fileobj=raw, mode="rb")
        elif path.endswith(".zst"):
            import zstandard

            stream = zstandard.ZstdDecompressor().stream_reader(raw)
        else:
            stream = raw
        seen = 0
        while True:
            try:
                block = stream.read(CHUNK_BYTES)
            except (OSError, EOFError, ValueError) as e:  # gzip/zstd report corrupt data so
                raise DataError(f"cannot decompress {path}: {e}") from e
            if not block:
                return
            yield block, raw.consumed - seen
            seen = raw.consumed
    finally:
        raw.close()


def _jsonl_tasks(path: str) -> Iterator[JsonlTask]:
    carry = b""
    line = 1
    pending_bytes = 0
    for block, n_bytes in _blocks(path):
        data = carry + block
        pending_bytes += n_bytes
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            carry = data
            continue
        yield JsonlTask(path, line, data[:cut], pending_bytes)
        line += data.count(b"\n", 0, cut)
        carry, pending_bytes = data[cut:], 0
    if carry or pending_bytes:
        yield JsonlTask(path, line, carry, pending_bytes)


def _safe_cut(data: bytes) -> int:
    """Just after the last newline between two visible ASCII characters, or 0 if there is none."""
    pos = data.rfind(b"\n", 1, len(data) - 1)
    while pos > 0 and not (data[pos - 1] in VISIBLE_ASCII and data[pos + 1] in VISIBLE_ASCII):
        pos = data.rfind(b"\n", 1, pos)
    return pos + 1 if pos > 0 else 0


def _document_cut(data: bytes, documents: str) -> int:
    """Just after the last document boundary in `data` (0 if none): a newline, or a blank line."""
    if documents == "line":
        return data.rfind(b"\n") + 1
    last = None
    for last in BLANK_LINE.finditer(data):  # noqa: B007 (the last match is the one wanted)
        pass
    return last.end() if last else 0


def _text_tasks(path: str, documents: str = "file") -> Iterator[TextTask]:
    carry = b""
    line = 1
    first = True
    pending_bytes = 0
    for block, n_bytes in _blocks(path):
        data = carry + block
        pending_bytes += n_bytes
        if documents == "file":
            cut = _safe_cut(data)
            if cut == 0 and len(data) > MAX_TEXT_PIECE:
                cut = data.rfind(b"\n") + 1
        else:
            # Whole documents per task, whatever their size: no document spans two pieces.
            cut = _document_cut(data, documents)
        if cut == 0:
            carry = data
            continue
        yield TextTask(path, line, data[:cut], first, False, pending_bytes, documents)
        line += data.count(b"\n", 0, cut)
        carry, first, pending_bytes = data[cut:], False, 0
    yield TextTask(path, line, carry, first, True, pending_bytes, documents)


def _parquet_tasks(path: str) -> Iterator[ParquetTask]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    size = os.path.getsize(path)
    total_rows = max(meta.num_rows, 1)
    row = 0
    for group in range(meta.num_row_groups):
        rows = meta.row_group(group).num_rows
        yield ParquetTask(path, group, row, size * rows // total_rows)
        row += rows


def _arrow_tasks(path: str, key: str) -> Iterator[ArrowTask]:
    import pyarrow as pa

    size = os.path.getsize(path)
    with _open_arrow(path) as reader:
        total = 0  # bytes of whole record batches read so far, to apportion the file's size
        parts, part_bytes, first_row, row = [], 0, 0, 0
        for batch in reader:
            column = batch.column(batch.schema.get_field_index(key))
            parts.append(column)
            part_bytes += batch.nbytes
            row += batch.num_rows
            if part_bytes >= CHUNK_BYTES:
                total += part_bytes
                yield ArrowTask(path, first_row, pa.concat_arrays(parts), part_bytes)
                parts, part_bytes, first_row = [], 0, row
        if parts:
            yield ArrowTask(path, first_row, pa.concat_arrays(parts), max(size - total, 0))


# ---------------------------------------------------------------- tasks (workers)


def _pieces_of(texts: list[str], tokenizer: TokenizerLike, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    ids = tokenizer.encode_batch(texts)
    lengths = np.fromiter((len(a) + 1 for a in ids), dtype=np.int64, count=len(ids))
    tokens = np.empty(int(lengths.sum()), dtype=dtype)
    end = 0
    for a in ids:
        tokens[end : end + len(a)] = a
        end += len(a)
        tokens[end] = tokenizer.eos_id
        end += 1
    return tokens, lengths


def _jsonl_texts(task: JsonlTask, key: str, piece: Piece) -> list[str]:
    texts = []
    for offset, line in enumerate(task.data.split(b"\n")):
        if not line.strip():
            continue
        piece.records += 1
        number = task.first_line + offset
        try:
            record = json.loads(line)
        except ValueError as e:
            piece.malformed("invalid JSON", task.path, number, f"not valid JSON: {e}")
            continue
        if not isinstance(record, dict):
            piece.malformed("not a JSON object", task.path, number, f"a JSON {type(record).__name__}, not an object")
            continue
        if key not in record:
            piece.malformed(f"missing key '{key}'", task.path, number, f"no key '{key}' (keys: {sorted(record)})")
            continue
        text = record[key]
        if text is None or text == "":
            piece.skip(EMPTY)
        elif not isinstance(text, str):
            piece.malformed("text not a string", task.path, number, f"'{key}' holds a {type(text).__name__}, not text")
        else:
            texts.append(text)
    return texts


def _text_of(task: TextTask, piece: Piece) -> str:
    try:
        return task.data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    # Keep the good lines and name each bad one.
    lines = task.data.split(b"\n")
    kept = []
    for offset, line in enumerate(lines):
        try:
            kept.append(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            piece.malformed(
                "not UTF-8", task.path, task.first_line + offset, f"not UTF-8 text: {e.reason} at byte {e.start}"
            )
    return "\n".join(kept)


def _text_documents(text: str, documents: str) -> list[str]:
    """The documents of whole lines of text: each non-blank line, or each run of them (a paragraph).

    Blank lines (empty or whitespace) separate documents and belong to none; a line's
    trailing carriage return (Windows line ends) is dropped.
    """
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if documents == "line":
        return [line for line in lines if line.strip()]
    paragraphs, current = [], []
    for line in lines:
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    if current:
        paragraphs.append("\n".join(current))
    return paragraphs


def run_task(task, tokenizer: TokenizerLike, key: str, dtype: np.dtype) -> Piece:
    """Tokenize one task: every document with its eos, bad records listed in `bad`."""
    piece = Piece(np.empty(0, dtype), np.empty(0, np.int64), n_bytes=task.n_bytes)
    if isinstance(task, TextTask):
        # Lines, counting an unterminated last one.
        piece.records = task.data.count(b"\n") + (len(task.data) > 0 and not task.data.endswith(b"\n"))
        if task.documents != "file":
            piece.tokens, piece.lengths = _pieces_of(
                _text_documents(_text_of(task, piece), task.documents), tokenizer, dtype
            )
            return piece
        ids = tokenizer.encode_batch([_text_of(task, piece)])[0]
        piece.tokens = np.empty(len(ids) + task.last, dtype=dtype)
        piece.tokens[: len(ids)] = ids
        if task.last:
            piece.tokens[-1] = tokenizer.eos_id
        piece.continues = not task.first
        piece.open_end = not task.last
        # An empty file is a document of nothing: skipped like an empty record.
        if task.first and task.last and len(ids) == 0:
            piece.tokens = piece.tokens[:0]
            piece.skip(EMPTY)
        else:
            piece.lengths = np.array([len(piece.tokens)], dtype=np.int64)
    else:
        if isinstance(task, JsonlTask):
            texts = _jsonl_texts(task, key, piece)
        else:
            column = task.column if isinstance(task, ArrowTask) else _parquet_column(task, key)
            values = column.to_pylist()
            texts = [t for t in values if t]
            piece.records = len(values)
            piece.skip(EMPTY, len(values) - len(texts))
        piece.tokens, piece.lengths = _pieces_of(texts, tokenizer, dtype)
    return piece


def _parquet_column(task: ParquetTask, key: str):
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(task.path).read_row_group(task.group, columns=[key])
    except Exception as e:
        raise DataError(
            f"cannot read row group {task.group} (rows from {task.first_row + 1}) of {task.path}: {e}"
        ) from e
    return table.column(0).combine_chunks()
