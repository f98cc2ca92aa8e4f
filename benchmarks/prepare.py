"""`sparsetron prepare`'s throughput at N workers, beside a plain single-process loop and megatron-core's builder.

A seeded synthetic jsonl corpus of --mb megabytes is written to a scratch folder: one
{"id": N, "text": ...} per line, the words drawn Zipf-like from a fixed vocabulary of
pseudo-words (some accented, Greek, Cyrillic or CJK, some with punctuation, paragraph
breaks), documents of a few hundred to a few thousand characters. A byte-level BPE tokenizer
(--vocab ids, "<|endoftext|>" as the end of a document) is trained on its first --train-mb
megabytes. Then each method below tokenizes the whole file into Megatron's .bin/.idx, each in
a fresh process, so that its peak memory and its tokenizer's thread settings are its own:

- baseline: one process reads lines, json.loads them and hands batches of 1000 texts to the
  tokenizer's `encode_batch_fast` in a plain loop; ids + eos go to the .bin through numpy, the
  lengths to the .idx at the end. Twice with a BPE: tokenizers' thread pool at its default
  (every core) and pinned to one thread (as in each prepare worker);
- megatron-core builder: the same loop on one thread, writing each document through
  `megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder.add_document`, then `finalize`;
- sparsetron prepare at each --workers count (0 tokenizes in its main process, where the
  tokenizer keeps its default thread pool).

Every run's .bin and .idx must be byte-identical to the single-thread baseline's, or the
benchmark stops (leaving the differing files in the scratch folder). A run's seconds go from
its first read to its index written and synced to disk; they leave out the interpreter's start,
imports and the main process's tokenizer load, and include starting prepare's workers.

    python benchmarks/prepare.py                     # 1 GB corpus, BPE of 16000, workers 0 1 2
    python benchmarks/prepare.py --mb 20             # a quick look
    python benchmarks/prepare.py --mb 2 --vocab 300 --workers 0 1 --no-megatron   # what the unit test runs
    python benchmarks/prepare.py --tokenizer byte --workers 1 2 4 --folder /scratch --output prepare.md
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import platform
import random
import shlex
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from sparsetron.train.data.tokenizer import token_dtype  # the rule prepare uses, so the .bin files compare
from sparsetron.train.progress import format_rate

MB = 1e6  # as prepare counts MB/s
BATCH_DOCS = 1000
EOS = "<|endoftext|>"
HERE = Path(__file__).resolve()
# Megatron's .idx: magic, version 1, dtype code, then lengths, pointers and document indices.
IDX_MAGIC = b"MMIDIDX\x00\x00"
DTYPE_CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}

# Corpus shape: a vocabulary large enough that a BPE of --vocab ids cannot hold every word whole
# (so rare words split into pieces, as in real text), drawn Zipf-like through a lookup table.
VOCAB_WORDS = 30_000
ZIPF_TABLE = 1 << 20
DOCS_PER_CHUNK = 4096  # ~5 MB of text per vectorized step: bounded temporaries, few Python steps
WORDS_PER_DOC = (120, 0.8, 20, 1500)  # lognormal median and sigma, clipped: ~150 B to ~10 KB
CONSONANTS = "bcdfghjklmnprstvwz"
VOWELS = "aeiou" * 4 + "y"
ACCENTED = "éèêáàäöüñçøå"
GREEK = "αβγδεζηθικλμνξοπρστυφχψω"
CYRILLIC = "абвгдежзийклмнопрстуфхцчшщыэюя"
EMOJI = "😀🙂🚀🌍🎉"
PUNCTUATION = ",.;:!?"

# The workers' CPU time is counted once they are reaped: prepare shuts its pool down before it returns.
SPARSETRON_CHILD = """
import json, resource, sys
from sparsetron.train.data.prepare import prepare
def cpu(who):
    u = resource.getrusage(who)
    return u.ru_utime + u.ru_stime
spec = json.loads(sys.argv[1])
main0, workers0 = cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_CHILDREN)
r = prepare([spec["input"]], spec["tokenizer"], spec["out"], workers=spec["workers"], progress="none")
print(json.dumps({"seconds": r.seconds, "bytes": r.bytes_in, "documents": r.documents, "tokens": r.tokens,
                  "peak_main_mb": r.peak_main_mb, "peak_worker_mb": r.peak_worker_mb,
                  "cpu_main_s": cpu(resource.RUSAGE_SELF) - main0,
                  "cpu_workers_s": cpu(resource.RUSAGE_CHILDREN) - workers0}))
"""


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=1024, help="size of the generated jsonl corpus in MB (1e6 bytes)")
    parser.add_argument("--tokenizer", choices=("bpe", "byte"), default="bpe", help="a BPE trained here, or bytes")
    parser.add_argument("--vocab", type=int, default=16000, help="vocabulary size of the BPE trained")
    parser.add_argument("--train-mb", type=float, default=4, help="MB of the corpus the BPE is trained on")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="prepare worker counts to time")
    parser.add_argument("--no-megatron", action="store_true", help="skip megatron-core's builder (~8 s to import)")
    parser.add_argument("--reps", type=int, default=1, help="passes over all methods, alternating order; best kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folder", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--output", default=None, help="also write the table to this file")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- corpus


def vocabulary(seed: int) -> list[bytes]:
    """Pseudo-words, each JSON-escaped, UTF-8 encoded and followed by a space, most frequent first."""
    rnd = random.Random(seed)  # scalar draws: the stdlib's are far cheaper than numpy's one by one
    words = []
    for _ in range(VOCAB_WORDS):
        kind = rnd.random()
        if kind < 0.02:
            word = "".join(rnd.choice(GREEK) for _ in range(rnd.randint(2, 9)))
        elif kind < 0.04:
            word = "".join(rnd.choice(CYRILLIC) for _ in range(rnd.randint(2, 10)))
        elif kind < 0.05:
            word = "".join(chr(0x4E00 + rnd.randrange(3000)) for _ in range(rnd.randint(1, 3)))
        elif kind < 0.052:
            word = rnd.choice(EMOJI)
        else:
            word = "".join(rnd.choice(CONSONANTS) + rnd.choice(VOWELS) for _ in range(rnd.randint(1, 4)))
            if rnd.random() < 0.3:
                word += rnd.choice(CONSONANTS)
            if rnd.random() < 0.08:
                at = rnd.randrange(len(word))
                word = word[:at] + rnd.choice(ACCENTED) + word[at + 1 :]
        variant = rnd.random()
        if variant < 0.06:
            word = word.capitalize()
        elif variant < 0.14:
            word += rnd.choice(PUNCTUATION)
        elif variant < 0.145:
            word = f'"{word}"'
        words.append(word)
    # A paragraph break among the frequent entries: documents hold newlines (escaped in the JSON).
    words.insert(40, "\n\n")
    return [json.dumps(w, ensure_ascii=False)[1:-1].encode("utf-8") + b" " for w in words]


def write_corpus(path: Path, mb: float, seed: int) -> tuple[int, int]:
    """Write about `mb` MB of jsonl to `path`; (bytes, documents).

    Each step draws the words of DOCS_PER_CHUNK documents at once and gathers their bytes
    from one buffer of the whole vocabulary with numpy, so only the per-document line
    framing is a Python loop.
    """
    entries = vocabulary(seed)
    rng = np.random.default_rng(seed)
    buf = np.frombuffer(b"".join(entries), dtype=np.uint8)
    word_len = np.array([len(e) for e in entries], dtype=np.int64)
    word_start = np.zeros(len(entries), dtype=np.int64)
    np.cumsum(word_len[:-1], out=word_start[1:])
    weights = 1.0 / (np.arange(len(entries)) + 10.0) ** 1.1
    cdf = np.cumsum(weights) / weights.sum()
    table = np.minimum(np.searchsorted(cdf, (np.arange(ZIPF_TABLE) + 0.5) / ZIPF_TABLE), len(entries) - 1)
    median, sigma, low, high = WORDS_PER_DOC
    target = int(mb * MB)
    written = docs = 0
    with open(path, "wb") as f:
        while written < target:
            n_words = np.clip(rng.lognormal(np.log(median), sigma, DOCS_PER_CHUNK), low, high).astype(np.int64)
            words = table[rng.integers(0, ZIPF_TABLE, int(n_words.sum()))]
            lens = word_len[words]
            ends = np.cumsum(lens)
            # Byte i of the chunk comes from its word's start in `buf` plus its offset in the word.
            src = np.repeat(word_start[words] - (ends - lens), lens) + np.arange(int(ends[-1]))
            text = buf[src].tobytes()
            lines = []
            lo = 0
            for hi in ends[np.cumsum(n_words) - 1].tolist():
                # Every entry ends with a space, so dropping the last byte never cuts an escape.
                line = b'{"id": %d, "text": "%s"}\n' % (docs, text[lo : hi - 1])
                lines.append(line)
                written += len(line)
                docs += 1
                lo = hi
                if written >= target:
                    break
            f.write(b"".join(lines))
    return written, docs


def train_bpe(corpus: str, out: str, vocab: int, sample_mb: float) -> dict:
    import tokenizers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts, seen = [], 0
    with open(corpus, "rb") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            seen += len(line)
            if seen >= sample_mb * MB:
                break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.save(out)
    # The trainer stops early when no pair is left to merge, so the size may fall short of `vocab`.
    return {
        "vocab": tok.get_vocab_size(with_added_tokens=True),
        "sample_mb": seen / MB,
        "version": tokenizers.__version__,
    }


# ---------------------------------------------------------------- the loops in child processes


def rss_mb(field: str) -> float:
    """VmHWM (peak) or VmRSS (now) of this process in MB."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def load_encoder(spec: str):
    """(encode(texts) -> (tokens, lengths) with eos after each text, token dtype) for `spec`."""
    if spec == "byte":
        dtype, eos = np.dtype(np.uint16), 256

        def encode_bytes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
            data = [t.encode("utf-8") for t in texts]
            lengths = np.fromiter((len(d) + 1 for d in data), dtype=np.int64, count=len(data))
            tokens = np.frombuffer(b"".join(d + b"\0" for d in data), dtype=np.uint8).astype(dtype)
            tokens[np.cumsum(lengths) - 1] = eos
            return tokens, lengths

        return encode_bytes, dtype

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(spec)
    dtype, eos = token_dtype(tok.get_vocab_size(with_added_tokens=True)), tok.token_to_id(EOS)

    def encode_bpe(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
        lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
        for x in ids:
            x.append(eos)
        return np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum())), lengths

    return encode_bpe, dtype


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PlainSink:
    """Tokens straight to the .bin; the lengths kept and written as a Megatron .idx at the end."""

    def __init__(self, prefix: str, dtype: np.dtype):
        self.prefix, self.dtype = prefix, dtype
        self.bin = open(prefix + ".bin", "wb")
        self.lengths: list[np.ndarray] = []

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        tokens.tofile(self.bin)
        self.lengths.append(lengths)

    def close(self) -> None:
        self.bin.close()
        lengths = np.concatenate(self.lengths) if self.lengths else np.empty(0, np.int64)
        n = len(lengths)
        pointers = np.zeros(n, dtype=np.int64)
        np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
        with open(self.prefix + ".idx", "wb") as f:
            f.write(IDX_MAGIC + struct.pack("<QBQQ", 1, DTYPE_CODES[self.dtype], n, n + 1))
            f.write(lengths.astype(np.int32).tobytes())
            f.write(pointers.tobytes())
            f.write(np.arange(n + 1, dtype=np.int64).tobytes())


class MegatronSink:
    """megatron-core's own builder, one `add_document` per document as its preprocess_data.py does."""

    def __init__(self, prefix: str, dtype: np.dtype):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # megatron-core warns at import about fused kernels it lacks
            from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = prefix
        self.builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype.type)

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        for doc in np.split(tokens, np.cumsum(lengths)[:-1]):
            self.builder.add_document(doc, [len(doc)])

    def close(self) -> None:
        self.builder.finalize(self.prefix + ".idx")


def tokenize_loop(spec: dict, sink_kind: str) -> dict:
    """The baseline: read, json.loads, encode BATCH_DOCS texts at a time, write."""
    encode, dtype = load_encoder(spec["tokenizer"])
    sink = (MegatronSink if sink_kind == "megatron" else PlainSink)(spec["out"], dtype)
    start_mb = rss_mb("VmRSS")
    documents = tokens = 0

    def flush(batch: list[str]) -> None:
        nonlocal documents, tokens
        if batch:
            ids, lengths = encode(batch)
            sink.add(ids, lengths)
            documents += len(lengths)
            tokens += len(ids)

    start, cpu_start = time.perf_counter(), time.process_time()
    batch: list[str] = []
    with open(spec["input"], "rb") as f:
        for line in f:
            if not line.strip():
                continue
            text = json.loads(line)[spec.get("key", "text")]
            if text:  # prepare skips empty texts too
                batch.append(text)
            if len(batch) == BATCH_DOCS:
                flush(batch)
                batch = []
    flush(batch)
    sink.close()
    # prepare syncs its output before it renames it; so do the others, so none is timed short.
    for suffix in (".bin", ".idx"):
        fsync_path(spec["out"] + suffix)
    return {
        "seconds": time.perf_counter() - start,
        "cpu_main_s": time.process_time() - cpu_start,  # every thread of this process
        "cpu_workers_s": 0.0,
        "bytes": os.path.getsize(spec["input"]),
        "documents": documents,
        "tokens": tokens,
        "peak_main_mb": rss_mb("VmHWM"),
        "peak_worker_mb": 0.0,
        "start_mb": start_mb,
    }


def child_main(argv: list[str]) -> str:
    """`--child KIND SPEC_JSON`: one measured run (or the BPE training); prints its result as JSON."""
    kind, spec = argv[0], json.loads(argv[1])
    if kind == "train":
        result = train_bpe(spec["input"], spec["out"], spec["vocab"], spec["sample_mb"])
    elif kind == "megatron":
        try:
            result = tokenize_loop(spec, "megatron")
        except ImportError as e:
            result = {"unavailable": f"megatron-core cannot be imported: {e}"}
    else:
        result = tokenize_loop(spec, "plain")
    text = json.dumps(result)
    print(text, flush=True)
    return text


# ---------------------------------------------------------------- the parent


def child_env(one_thread: bool) -> dict[str, str]:
    """The environment of a run: tokenizers' thread pool at its default, or pinned to one thread."""
    env = dict(os.environ)
    # Passed explicitly: tokenizers' fork handler may rewrite a forked child's own environment.
    env.pop("TOKENIZERS_PARALLELISM", None)
    env.pop("RAYON_NUM_THREADS", None)
    if one_thread:
        env["TOKENIZERS_PARALLELISM"] = "false"
        env["RAYON_NUM_THREADS"] = "1"
    return env


def run_child(label: str, kind: str, spec: dict, one_thread: bool) -> dict:
    if kind == "sparsetron":
        # `python -c`: prepare's spawned workers then re-import no __main__ file, as under the CLI.
        cmd = [sys.executable, "-c", SPARSETRON_CHILD, json.dumps(spec)]
    else:
        cmd = [sys.executable, str(HERE), "--child", kind, json.dumps(spec)]
    proc = subprocess.run(cmd, env=child_env(one_thread), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def digest(prefix: str) -> str:
    """sha256 of the .bin then the .idx: equal digests mean the same tokens, documents and dtype."""
    h = hashlib.sha256()
    for suffix in (".bin", ".idx"):
        with open(prefix + suffix, "rb") as f:
            while block := f.read(8 << 20):
                h.update(block)
    return h.hexdigest()


def check_same(label: str, result: dict, found: str, reference: tuple[str, dict, str], prefix: str) -> None:
    """Stop the benchmark when a run's output is not byte for byte the reference run's."""
    ref_label, ref, ref_digest = reference
    if found != ref_digest or result["documents"] != ref["documents"] or result["tokens"] != ref["tokens"]:
        raise RuntimeError(
            f"{label} wrote a different token stream than {ref_label}: {result['documents']:,} documents, "
            f"{result['tokens']:,} tokens, sha256 {found[:16]} vs {ref['documents']:,}, {ref['tokens']:,}, "
            f"{ref_digest[:16]}; its output is kept at {prefix}.bin/.idx"
        )


def remove_outputs(prefix: str) -> None:
    for suffix in (".bin", ".idx"):
        if os.path.exists(prefix + suffix):
            os.remove(prefix + suffix)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def measure(args: argparse.Namespace, argv: list[str], folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load = os.getloadavg()[0]
    corpus = folder / "corpus.jsonl"
    start = time.perf_counter()
    size, n_docs = write_corpus(corpus, args.mb, args.seed)
    gen_s = time.perf_counter() - start

    if args.tokenizer == "byte":
        spec, tok_desc = "byte", "bytes (vocab 257)"
    else:
        spec = str(folder / "tokenizer.json")
        start = time.perf_counter()
        trained = run_child(
            "BPE training",
            "train",
            {"input": str(corpus), "out": spec, "vocab": args.vocab, "sample_mb": args.train_mb},
            one_thread=False,
        )
        tok_desc = (
            f"byte-level BPE of {trained['vocab']:,} ids trained on {trained['sample_mb']:.1f} MB of the corpus "
            f"in {time.perf_counter() - start:.1f} s (tokenizers {trained['version']})"
        )

    # (label, kind, workers, tokenizer threads shown, pinned to one thread?)
    all_threads = f"all ({cpus})"
    plan = [("baseline", "baseline", None, "1", True)]
    if spec != "byte":  # bytes never touch tokenizers' thread pool
        plan.append(("baseline", "baseline", None, all_threads, False))
    if not args.no_megatron:
        plan.append(("megatron-core builder", "megatron", None, "1", True))
    plan += [("sparsetron prepare", "sparsetron", w, all_threads if w == 0 else "1 each", False) for w in args.workers]

    best: dict[int, dict] = {}
    notes: list[str] = []
    reference = None
    # Repeated passes alternate the order (the VM's speed drifts over minutes) and keep each method's fastest run.
    order = [i for rep in range(args.reps) for i in (range(len(plan)) if rep % 2 == 0 else reversed(range(len(plan))))]
    for i in order:
        label, kind, workers, threads, one_thread = plan[i]
        prefix = str(folder / f"out-{i}-{kind}")
        remove_outputs(prefix)
        run = {"input": str(corpus), "tokenizer": spec, "out": prefix, "workers": workers}
        name = f"{label} ({workers} workers)" if workers is not None else f"{label} ({threads} threads)"
        try:
            result = run_child(name, kind, run, one_thread)
        except RuntimeError as e:
            if kind != "megatron":
                raise
            # Only the optional peer may fail without stopping the benchmark; the note says why.
            result = {"unavailable": f"it failed: {str(e).strip().splitlines()[-1]}"}
        if "unavailable" in result:
            if i not in best:
                notes.append(f"megatron-core builder: not measured, {result['unavailable']}")
            remove_outputs(prefix)
            continue
        found = digest(prefix)
        if reference is None:
            reference = (name, result, found)
        check_same(name, result, found, reference, prefix)
        remove_outputs(prefix)
        if kind == "megatron" and i not in best:
            notes.append(
                "megatron-core builder: driven directly (`IndexedDatasetBuilder(bin, dtype)`, `add_document(ids, "
                "[len])` per document, `finalize(idx)`); its peak memory includes importing megatron-core and "
                f"torch ({result['start_mb']:,.0f} MB resident before its loop)."
            )
        if i not in best or result["seconds"] < best[i]["seconds"]:
            best[i] = result
    rows = [(*plan[i][:4], best[i]) for i in sorted(best)]

    header = [
        f"sparsetron prepare: {size / MB:,.1f} MB jsonl, {n_docs:,} documents, "
        f"{rows[0][4]['tokens']:,} tokens (corpus generated in {gen_s:.1f} s, seed {args.seed})",
        f"tokenizer: {tok_desc}",
        f"machine: {cpus} CPUs available ({cpu_name()}), load average {load:.2f} at the start and "
        f"{os.getloadavg()[0]:.2f} at the end; Python {platform.python_version()}, numpy {np.__version__}",
        f"command: python benchmarks/prepare.py {shlex.join(argv)}".rstrip(),
    ]
    footer = [
        f"Every run's .bin and .idx are byte-identical to the first's (sha256 {reference[2][:16]}).",
        f"Each method's fastest of {args.reps} passes (alternating order). "
        "MB = 1e6 bytes of input. Seconds: from the first read to the index synced to disk; prepare's include "
        "starting its worker processes, each loading the tokenizer. CPU s: user + system time of the main "
        "process (all its threads) and of the workers together, their start included. Peak memory: each "
        "process's VmHWM.",
        *notes,
    ]
    return "\n".join([*header, "", *table(rows), "", *footer])


def table(rows: list[tuple]) -> list[str]:
    def rate(result: dict) -> float:
        return result["bytes"] / MB / max(result["seconds"], 1e-9)

    base = rate(rows[0][4])
    one_worker = next((rate(r) for _, kind, w, _, r in rows if kind == "sparsetron" and w == 1), None)
    lines = [
        "| method | workers | tokenizer threads | MB/s | docs/s | tokens/s | x baseline 1 thread "
        "| x prepare 1 worker (ideal) | CPU s main + workers | peak main MB | peak per worker MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, kind, workers, threads, result in rows:
        seconds = max(result["seconds"], 1e-9)
        scaling = "-"
        if kind == "sparsetron" and one_worker:
            scaling = f"{rate(result) / one_worker:.2f}" + (f" ({workers})" if workers else "")
        cpu = f"{result['cpu_main_s']:.1f}" + (f" + {result['cpu_workers_s']:.1f}" if workers else "")
        per_worker = f"{result['peak_worker_mb']:,.0f}" if result["peak_worker_mb"] else "-"
        lines.append(
            f"| {label} | {'-' if workers is None else workers} | {threads} | {rate(result):,.1f} "
            f"| {format_rate(result['documents'] / seconds)} | {format_rate(result['tokens'] / seconds)} "
            f"| {rate(result) / base:.2f} | {scaling} | {cpu} | {result['peak_main_mb']:,.0f} | {per_worker} |"
        )
    return lines


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        return child_main(argv[1:])
    # Imported here, not at the top: report imports torch, which the child runs (this same file)
    # must not load, or their peak memory and start-up would carry it.
    from report import emit

    args = parse(argv)
    if args.folder:
        return emit(measure(args, argv, Path(args.folder)), args.output)
    with tempfile.TemporaryDirectory(prefix="sparsetron-prepare-bench-") as scratch:
        return emit(measure(args, argv, Path(scratch)), args.output)


if __name__ == "__main__":
    main()
