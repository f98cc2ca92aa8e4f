"""`sparsetron prepare`: tokenize a corpus into Megatron's indexed format, streaming.

    sparsetron prepare --input 'corpus/*.jsonl.zst' --tokenizer tok/ --out data/corpus --workers 16

The main process reads each input in pieces of a few MB (`inputs.read_tasks`), N worker
processes tokenize them (`inputs.run_task`), and the main process writes their answers
in input order (`indexed.IndexedWriter`). At most 2 N pieces are in flight, so memory
stays bounded whatever the corpus size: about (2 N + 2) pieces of text and tokens, plus
each process's tokenizer. `workers=0` tokenizes in the main process (small corpora).

Each worker runs its tokenizer on one thread, so N workers use N cores. Malformed
records are counted and skipped, and an input where more than `max_skipped_fraction`
of the records are malformed fails once it has been read (the same default as train's
data.max_skipped_fraction; 1 = any number, --skip-bad-lines; 0 = the first malformed
record stops the run with its file and line). An input that
yields no document always fails (`skipped.check_tallies`, which train applies too).
An interrupted run removes its temporary files, and even a killed one leaves only
`*.partial-<pid>` names that no reader takes for data.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import TextIO

import numpy as np

from sparsetron.train.data.errors import DataError
from sparsetron.train.data.indexed import PARTIAL, IndexedWriter, existing_outputs
from sparsetron.train.data.inputs import (
    TEXT_DOCUMENTS,
    Input,
    Piece,
    check_input,
    output_name,
    peak_rss_mb,
    read_tasks,
    resolve_inputs,
    run_task,
)
from sparsetron.train.data.skipped import MAX_SKIPPED_FRACTION, Tally, check_tallies, skipped_lines
from sparsetron.train.data.tokenizer import build_tokenizer, token_dtype
from sparsetron.train.processes import pid_alive
from sparsetron.train.progress import format_duration, format_rate

__all__ = ["PrepareResult", "default_workers", "prepare"]

# Bad records listed in the summary of a --skip-bad-lines run.
BAD_SHOWN = 5
LIVE_INTERVAL_S = 0.5
PLAIN_INTERVAL_S = 30.0
MB = 1e6


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class PrepareResult:
    outputs: list[str] = field(default_factory=list)
    """The prefixes written."""
    documents: int = 0
    tokens: int = 0
    bytes_in: int = 0
    seconds: float = 0.0
    tallies: list[Tally] = field(default_factory=list)
    """Each input read: its records, documents and skipped records by reason."""
    bad: list[tuple[str, int, str]] = field(default_factory=list)
    """The first BAD_SHOWN malformed records skipped."""
    bad_count: int = 0
    peak_main_mb: float = 0.0
    peak_worker_mb: float = 0.0
    """Largest peak resident memory of one worker (0 without workers)."""

    def summary(self, dtype: np.dtype) -> str:
        rate = self.bytes_in / MB / max(self.seconds, 1e-9)
        if len(self.outputs) <= 3:
            where = f"{', '.join(self.outputs)} (.bin/.idx)"
        else:
            where = f"{len(self.outputs)} .bin/.idx pairs ({self.outputs[0]}, ...)"
        lines = [
            f"wrote {where}: {self.documents:,} documents, {self.tokens:,} {dtype} tokens",
            f"read {self.bytes_in / MB:,.1f} MB in {format_duration(self.seconds)}: {rate:,.1f} MB/s, "
            f"{format_rate(self.documents / max(self.seconds, 1e-9))} documents/s",
            f"peak memory: main process {self.peak_main_mb:,.0f} MB"
            + (f", each worker at most {self.peak_worker_mb:,.0f} MB" if self.peak_worker_mb else ""),
        ]
        lines.extend(skipped_lines(self.tallies))
        if self.bad:
            lines.append("the first malformed records:")
            lines.extend(f"  {path}:{line}: {why}" for path, line, why in self.bad)
        return "\n".join(lines)


class _Progress:
    """One line of MB/s, documents/s, tokens and ETA: redrawn on a terminal, printed now and then otherwise."""

    def __init__(self, total_bytes: int, mode: str, file: TextIO):
        self.total = total_bytes
        self.file = file
        self.live = mode == "live" or (mode == "auto" and file.isatty())
        self.enabled = mode != "none"
        self.start = self.last = time.monotonic()

    def update(self, done: PrepareResult, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not final and now - self.last < (LIVE_INTERVAL_S if self.live else PLAIN_INTERVAL_S)):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = done.bytes_in / elapsed
        eta = (self.total - done.bytes_in) / rate if rate > 0 else float("inf")
        line = (
            f"prepare: {done.bytes_in / MB:,.1f}/{self.total / MB:,.1f} MB  {rate / MB:,.1f} MB/s  "
            f"{format_rate(done.documents / elapsed)} docs/s  {format_rate(done.tokens)} tokens  "
            f"ETA {format_duration(0 if final else eta)}"
        )
        if self.live:
            print(f"\r{line}\x1b[K", end="\n" if final else "", file=self.file, flush=True)
        else:
            print(line, file=self.file, flush=True)


# ---------------------------------------------------------------- workers

_worker: tuple | None = None  # (tokenizer, key, dtype) of this worker process


def _init_worker(tokenizer_spec: str, eos_token: str | None, key: str) -> None:
    global _worker
    # The main process handles Ctrl-C; tokenizers' own thread pool would oversubscribe N workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = build_tokenizer(tokenizer_spec, eos_token)
    _worker = (tokenizer, key, token_dtype(tokenizer.vocab_size))


def _work(task) -> Piece:
    tokenizer, key, dtype = _worker
    piece = run_task(task, tokenizer, key, dtype)
    piece.peak_rss_mb = peak_rss_mb()
    return piece


def _pieces(tasks: Iterator, pool, workers: int, local) -> Iterator[Piece]:
    """Answers to `tasks` in order, at most 2 x workers computed ahead."""
    if pool is None:
        for task in tasks:
            yield run_task(task, *local)
        return
    pending: deque = deque()
    try:
        for task in tasks:
            pending.append(pool.submit(_work, task))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool as e:
        raise DataError(f"a prepare worker process died ({e}); its error is printed above") from e


# ---------------------------------------------------------------- planning


def _plan(inputs: list[Input], out: str, per_file: bool) -> list[tuple[str, list[Input]]]:
    """(prefix, inputs written into it) for every output; no output may exist yet."""
    if not per_file:
        plan = [(out, inputs)]
    else:
        if os.path.isfile(out):
            raise DataError(f"--out {out} is a file; with --per-file it names a folder for one prefix per input")
        named: dict[str, Input] = {}
        for item in inputs:
            name = output_name(item.path)
            if name in named:
                raise DataError(
                    f"--per-file: inputs {named[name].path} and {item.path} would both write {os.path.join(out, name)}"
                )
            named[name] = item
        plan = [(os.path.join(out, name), [item]) for name, item in named.items()]
    for prefix, _ in plan:
        taken = existing_outputs(prefix)
        if taken:
            raise DataError(f"output {taken[0]} already exists; remove it or choose another --out")
    return plan


def _remove_stale_partials(prefix: str) -> None:
    """Temporary files of a killed earlier prepare of `prefix` (its process is gone)."""
    folder = os.path.dirname(os.path.abspath(prefix))
    if not os.path.isdir(folder):
        return
    pattern = re.compile(re.escape(os.path.basename(prefix)) + r"\.(bin|idx|lengths)" + re.escape(PARTIAL) + r"(\d+)$")
    for name in os.listdir(folder):
        match = pattern.match(name)
        if match and not pid_alive(int(match.group(2))):
            os.remove(os.path.join(folder, name))


# ---------------------------------------------------------------- the run


def prepare(
    inputs: list[str],
    tokenizer: str,
    out: str,
    *,
    workers: int = 1,
    text_key: str = "text",
    fmt: str = "auto",
    max_skipped_fraction: float = MAX_SKIPPED_FRACTION,
    text_documents: str = "file",
    per_file: bool = False,
    max_documents: int = 0,
    eos_token: str | None = None,
    progress: str = "auto",
    file: TextIO | None = None,
) -> PrepareResult:
    """Tokenize `inputs` into `out` (.bin/.idx), or one prefix per input under the folder `out`.

    `tokenizer` is "byte" or a tokenizer.json (or its folder); `eos_token` overrides the
    end-of-document token it would find itself. `max_skipped_fraction` is the share of an
    input's records that may be malformed (0 = stop at the first); `text_documents` says
    how a text file splits into documents (TEXT_DOCUMENTS).
    """
    file = file if file is not None else sys.stderr
    if workers < 0:
        raise DataError(f"--workers must be >= 0, got {workers}")
    if not 0 <= max_skipped_fraction <= 1:
        raise DataError(f"--max-skipped-fraction must be in [0, 1], got {max_skipped_fraction}")
    if text_documents not in TEXT_DOCUMENTS:
        raise DataError(f"--text-documents must be one of {', '.join(TEXT_DOCUMENTS)}, got '{text_documents}'")
    tok = build_tokenizer(tokenizer, eos_token)
    dtype = token_dtype(tok.vocab_size)
    resolved = resolve_inputs(inputs, fmt)
    for item in resolved:
        check_input(item, text_key)
    plan = _plan(resolved, out, per_file)
    for prefix, _ in plan:
        _remove_stale_partials(prefix)

    result = PrepareResult()
    bar = _Progress(sum(item.size for item in resolved), progress, file)
    start = time.monotonic()
    pool = None
    if workers:
        spawn = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(workers, spawn, initializer=_init_worker, initargs=(tokenizer, eos_token, text_key))
    try:
        for prefix, items in plan:
            with IndexedWriter(prefix, dtype) as writer:
                for item in items:
                    pieces = _pieces(read_tasks(item, text_key, text_documents), pool, workers, (tok, text_key, dtype))
                    tally = Tally(item.path)
                    result.tallies.append(tally)
                    reached = _write(pieces, writer, result, tally, max_documents, max_skipped_fraction == 0, bar)
                    check_tallies([tally], max_skipped_fraction, "--max-skipped-fraction")
                    if reached:
                        break
                writer.commit()
            result.outputs.append(prefix)
            if max_documents and result.documents >= max_documents:
                break
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    result.seconds = time.monotonic() - start
    result.peak_main_mb = peak_rss_mb()
    bar.update(result, final=True)
    return result


def _write(
    pieces: Iterator[Piece],
    writer: IndexedWriter,
    result: PrepareResult,
    tally: Tally,
    limit: int,
    fail_fast: bool,
    bar,
) -> bool:
    """Append every piece of one input to `writer`, counted in `tally`; True once `limit`
    documents in all (> 0) are written. `fail_fast` stops at the first malformed record."""
    for piece in pieces:
        if piece.bad:
            path, line, why = piece.bad[0]
            if fail_fast:
                raise DataError(f"{path}:{line}: {why} (--skip-bad-lines or --max-skipped-fraction skip such records)")
            tally.first_bad = tally.first_bad or f"{path}:{line}: {why}"
            result.bad_count += len(piece.bad)
            result.bad.extend(piece.bad[: max(BAD_SHOWN - len(result.bad), 0)])
        tokens, lengths = piece.tokens, piece.lengths
        completed = len(lengths) - piece.open_end
        reached = bool(limit) and result.documents + completed >= limit
        if reached:
            # Completed documents come first in a piece; an open one at its end is dropped.
            completed = limit - result.documents
            lengths = lengths[:completed]
            tokens = tokens[: int(lengths.sum())]
        writer.add(tokens, lengths, piece.continues)
        result.documents += completed
        result.tokens += len(tokens)
        result.bytes_in += piece.n_bytes
        tally.documents += completed
        tally.records += piece.records
        tally.add(piece.skipped)
        result.peak_worker_mb = max(result.peak_worker_mb, piece.peak_rss_mb)
        bar.update(result)
        if reached:
            return True
    return False
