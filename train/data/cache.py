"""Text, jsonl, parquet and saved Hugging Face datasets at train time: tokenized once, cached by content.

`train` on such a source runs `prepare` into a cache folder and reads the result like
any Megatron prefix: from a memory map, so memory stays bounded and the loader's read
position (epoch, index) resumes exactly. The cache entry's name is a hash of what the
tokens depend on: every input file's bytes, the tokenizer file's bytes and eos, the
text key, the format, how text splits into documents, and max_documents. A second run
(or a resumed one) over the same files reads the entry at once; an edited file or
another tokenizer gets a new entry. Beside the .bin/.idx pair the entry keeps each
input's tally of records read and skipped (P.skipped.json, written last: an entry
without it is incomplete), so a run that reads the entry reports and checks them too.

Ranks of one node share the entry: the first to take the entry's lock tokenizes, the
others wait for it and read. A corpus above `data.max_tokenize_gb` is refused with the
`sparsetron prepare` command to run instead (tokenizing it at every new start of a
multi-node job would leave the GPUs idle).
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import sys
import tempfile

import xxhash

from sparsetron.train.data.errors import DataError
from sparsetron.train.data.indexed import existing_outputs
from sparsetron.train.data.inputs import Input, resolve_inputs
from sparsetron.train.data.skipped import Tally, tallies_from_json, tallies_to_json
from sparsetron.train.data.tokenizer import TokenizerLike, tokenizer_spec

__all__ = ["CACHE_ENV", "cache_folder", "cached_tallies", "tokenized_prefix"]

CACHE_ENV = "SPARSETRON_DATA_CACHE"
# Bump when the tokens written for the same inputs change (a reader or writer fix).
CACHE_VERSION = 2
HASHES_FILE = "content-hashes.json"
TALLIES_SUFFIX = ".skipped.json"
HASH_BLOCK = 16 << 20
# Below this many input bytes the tokenization runs in the training process itself.
IN_PROCESS_BYTES = 64 << 20
GB = 1e9


def cache_folder(configured: str) -> str:
    """data.cache_dir, else $SPARSETRON_DATA_CACHE, else ~/.cache/sparsetron/data."""
    return (
        configured or os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "sparsetron", "data")
    )


def _file_hash(path: str, memo: dict[str, str]) -> str:
    """XXH3-128 of a file's bytes, remembered by (path, size, mtime) so a rerun reads nothing."""
    stat = os.stat(path)
    tag = f"{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}"
    if tag not in memo:
        digest = xxhash.xxh3_128()
        with open(path, "rb") as f:
            while block := f.read(HASH_BLOCK):
                digest.update(block)
        memo[tag] = digest.hexdigest()
    return memo[tag]


def _load_memo(folder: str) -> dict[str, str]:
    try:
        with open(os.path.join(folder, HASHES_FILE), encoding="utf-8") as f:
            memo = json.load(f)
        return memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_memo(folder: str, memo: dict[str, str]) -> None:
    # A private temporary file per writer: ranks (or threads) saving at once never share one.
    fd, tmp = tempfile.mkstemp(prefix=HASHES_FILE + ".", dir=folder)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(memo, f)
    os.replace(tmp, os.path.join(folder, HASHES_FILE))


def _tokenizer_identity(spec: str, tokenizer: TokenizerLike, memo: dict[str, str]) -> str:
    if spec == "byte":
        return "byte"
    return f"{_file_hash(spec, memo)}:eos={tokenizer.eos_id}"


def _prepare_command(paths: list[str], fmt: str, spec: str, key: str, text_documents: str) -> str:
    words = ["sparsetron", "prepare"]
    for path in paths:
        words += ["--input", path]
    words += ["--format", fmt, "--tokenizer", spec, "--text-key", key]
    if text_documents != "file":
        words += ["--text-documents", text_documents]
    words += ["--out", "data/corpus"]
    return shlex.join(words)


def cached_tallies(prefix: str) -> list[Tally]:
    """Each input's records read and skipped, as the cache entry `prefix` was built."""
    with open(prefix + TALLIES_SUFFIX, encoding="utf-8") as f:
        return tallies_from_json(json.load(f))


def _complete(prefix: str) -> bool:
    return len(existing_outputs(prefix)) == 2 and os.path.exists(prefix + TALLIES_SUFFIX)


def tokenized_prefix(
    paths: list[str],
    fmt: str,
    text_key: str,
    tokenizer: TokenizerLike,
    max_documents: int,
    cache_dir: str,
    max_gb: float,
    what: str = "data.paths",
    text_documents: str = "file",
) -> str:
    """The cache prefix holding `paths` tokenized (built here when missing).

    Malformed records are skipped and counted (`cached_tallies`): the caller checks them."""
    spec, eos_token = tokenizer_spec(tokenizer)
    inputs: list[Input] = resolve_inputs(paths, fmt)
    size = sum(item.size for item in inputs)
    if max_gb and size > max_gb * GB:
        raise DataError(
            f"{what} hold {size / GB:,.1f} GB of {fmt}, more than data.max_tokenize_gb={max_gb:g} GB that train "
            f"tokenizes itself. Tokenize it once with\n  {_prepare_command(paths, fmt, spec, text_key, text_documents)}\n"
            "then train with data.source=megatron and data.paths=[data/corpus] "
            "(or raise data.max_tokenize_gb)"
        )
    folder = cache_folder(cache_dir)
    os.makedirs(folder, exist_ok=True)
    memo = _load_memo(folder)
    digest = xxhash.xxh3_128()
    parts = [f"v{CACHE_VERSION}", fmt, text_key, text_documents, str(max_documents)]
    parts.append(_tokenizer_identity(spec, tokenizer, memo))
    parts += [_file_hash(path, memo) for item in inputs for path in item.files]
    digest.update("\n".join(parts).encode())
    _save_memo(folder, memo)
    prefix = os.path.join(folder, f"{fmt}-{digest.hexdigest()[:20]}")
    if _complete(prefix):
        return prefix
    with open(prefix + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another rank may be writing this entry: wait for it
        if _complete(prefix):
            return prefix
        for path in existing_outputs(prefix):  # a build killed between its renames
            os.remove(path)
        from sparsetron.train.data.prepare import default_workers, prepare

        workers = 0 if size < IN_PROCESS_BYTES else default_workers()
        print(
            f"data: tokenizing {what} ({len(inputs)} inputs, {size / 1e6:,.1f} MB) once into {prefix} "
            f"with {workers or 'no'} worker processes; later runs read it",
            file=sys.stderr,
            flush=True,
        )
        result = prepare(
            [item.path for item in inputs],
            spec,
            prefix,
            workers=workers,
            text_key=text_key,
            fmt=fmt,
            max_skipped_fraction=1.0,  # every malformed record counted; the caller applies its limit
            text_documents=text_documents,
            max_documents=max_documents,
            eos_token=eos_token,
            progress="plain",
        )
        # Published last, through a private temporary file: its presence completes the entry.
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(prefix) + TALLIES_SUFFIX + ".", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(tallies_to_json(result.tallies), f)
        os.replace(tmp, prefix + TALLIES_SUFFIX)
    return prefix
