"""Tokenizers: raw UTF-8 bytes, or a local Hugging Face `tokenizers` file.

Both share one small interface (`vocab_size`, `eos_id`, `encode`, `decode`,
`encode_batch`, `encode_documents`); nothing here ever touches the network.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from sparsetron.train.data.errors import DataError

__all__ = ["ByteTokenizer", "HFTokenizer", "TokenizerLike", "build_tokenizer", "token_dtype", "tokenizer_spec"]

# Tried in order when neither the caller nor tokenizer_config.json names the eos token.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>", "[EOS]")

# Text per call into the Rust tokenizer: large enough to use its threads, small enough
# that its per-token Encoding objects (some 100 bytes a token) stay a few tens of MB.
HF_CHUNK_DOCS = 2048
HF_CHUNK_CHARS = 1 << 18


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype that holds every id of a vocabulary (ids are 0..vocab_size-1)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def _flatten(id_arrays: Sequence[np.ndarray], eos_id: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """One stream of every document followed by eos, and where each document starts."""
    lengths = np.fromiter((len(a) + 1 for a in id_arrays), dtype=np.int64, count=len(id_arrays))
    starts = np.zeros(len(id_arrays), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    tokens = np.empty(int(lengths.sum()), dtype=dtype)
    for start, ids in zip(starts.tolist(), id_arrays, strict=True):
        tokens[start : start + len(ids)] = ids
    tokens[starts + lengths - 1] = eos_id
    return tokens, starts


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; id 256 ends a document."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        # The eos id is not a byte: drop it so a decoded stream reads as the source text.
        data = bytes(int(i) for i in ids if int(i) != self.eos_id)
        return data.decode("utf-8", errors="replace")

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Each text's ids, without eos.

        A zero-copy uint8 view of each text's bytes is already its ids; a per-token
        Python list would cost seconds on the whole standard library.
        """
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def encode_documents(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of all texts, each followed by eos, and each document's start offset."""
        return _flatten(self.encode_batch(texts), self.eos_id, token_dtype(self.vocab_size))


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer read from a local tokenizer.json.

    `path` is the file itself or a folder holding it. The eos token is `eos_token`
    when given, else the one named in a neighbouring tokenizer_config.json, else the
    first of EOS_CANDIDATES the vocabulary knows.
    """

    def __init__(self, path: str, eos_token: str | None = None):
        from tokenizers import Tokenizer

        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise DataError(f"tokenizer file not found: {file}")
        try:
            self._tok = Tokenizer.from_file(file)
        except Exception as e:  # the Rust side raises plain Exception for any parse error
            raise DataError(f"cannot read tokenizer {file}: {e}") from e
        self.path = file
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_token = eos_token or self._configured_eos(os.path.dirname(file))
        names = (self.eos_token,) if self.eos_token else EOS_CANDIDATES
        ids = [(n, self._tok.token_to_id(n)) for n in names]
        found = [(n, i) for n, i in ids if i is not None]
        if not found:
            raise DataError(f"tokenizer {file} has no end-of-document token; tried {list(names)}")
        self.eos_token, self.eos_id = found[0]

    @staticmethod
    def _configured_eos(folder: str) -> str | None:
        cfg_file = os.path.join(folder, "tokenizer_config.json")
        if not os.path.isfile(cfg_file):
            return None
        try:
            with open(cfg_file, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token")
        except (OSError, ValueError, AttributeError):
            return None  # a broken side file should not hide the candidates search
        if isinstance(eos, dict):  # transformers writes AddedToken objects as dicts
            eos = eos.get("content")
        return eos if isinstance(eos, str) else None

    def encode(self, text: str) -> list[int]:
        # No special tokens: documents are framed by eos here, not by a template.
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Each text's ids, without eos."""
        arrays: list[np.ndarray] = []
        chunk: list[str] = []
        chars = 0
        for i, text in enumerate(texts):
            chunk.append(text)
            chars += len(text)
            if chars >= HF_CHUNK_CHARS or len(chunk) == HF_CHUNK_DOCS or i == len(texts) - 1:
                for enc in self._tok.encode_batch_fast(chunk, add_special_tokens=False):
                    arrays.append(np.asarray(enc.ids, dtype=np.int64))
                chunk, chars = [], 0
        return arrays

    def encode_documents(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of all texts, each followed by eos, and each document's start offset."""
        return _flatten(self.encode_batch(texts), self.eos_id, token_dtype(self.vocab_size))


class TokenizerLike(Protocol):
    """What the data pipeline (and the trainer) needs of a tokenizer."""

    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def encode_documents(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]: ...


def build_tokenizer(spec: str, eos_token: str | None = None) -> TokenizerLike:
    """ "byte", or a local tokenizer.json (or a folder holding one), optionally with its eos token named."""
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec, eos_token)


def tokenizer_spec(tokenizer: TokenizerLike) -> tuple[str, str | None]:
    """The (spec, eos_token) that `build_tokenizer` turns back into this tokenizer (in another process)."""
    if isinstance(tokenizer, ByteTokenizer):
        return "byte", None
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.path, tokenizer.eos_token
    raise TypeError(f"cannot rebuild a tokenizer of type {type(tokenizer).__name__} in another process")
