"""Several token arrays (memory maps of .bin files) read as one stream, without copying.

A corpus prepared in a thousand shards must not be concatenated into memory to be
packed: `ConcatTokens` answers what packing asks of a token array (its length, a slice,
an integer-array index) by looking each position up in its shard.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ConcatTokens", "concat_tokens"]


class ConcatTokens:
    """The concatenation of `parts` (1-D integer arrays), as a read-only array-like [N]."""

    def __init__(self, parts: list[np.ndarray], dtype: np.dtype, lo: int = 0, hi: int | None = None):
        self.parts = parts
        self.dtype = np.dtype(dtype)
        self._ends = np.cumsum([len(p) for p in parts], dtype=np.int64)  # [P]
        total = int(self._ends[-1]) if len(parts) else 0
        self._lo = lo
        self._hi = total if hi is None else hi

    def __len__(self) -> int:
        return self._hi - self._lo

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("ConcatTokens slices must be contiguous")
            return ConcatTokens(self.parts, self.dtype, self._lo + start, self._lo + max(start, stop))
        pos = np.asarray(key, dtype=np.int64)
        if pos.size and (pos.min() < -len(self) or pos.max() >= len(self)):
            raise IndexError(f"token position out of range [0, {len(self)})")
        pos = np.where(pos < 0, pos + len(self), pos) + self._lo
        part = np.searchsorted(self._ends, pos, side="right")
        starts = self._ends - np.array([len(p) for p in self.parts], dtype=np.int64)
        out = np.empty(pos.shape, dtype=self.dtype)
        for p in np.unique(part).tolist():
            mask = part == p
            out[mask] = self.parts[p][pos[mask] - starts[p]]
        return out if out.ndim else out[()]


def concat_tokens(parts: list[np.ndarray], dtype: np.dtype) -> np.ndarray | ConcatTokens:
    """One part as it is (a memmap stays a memmap), several as a ConcatTokens view."""
    return parts[0] if len(parts) == 1 else ConcatTokens(parts, dtype)
