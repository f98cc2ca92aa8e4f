"""Packing: a token stream cut into fixed-length training windows.

Window i covers stream positions [i*S, i*S + S] (S+1 tokens): its first S tokens are
the inputs and its last S the targets, so consecutive windows share one token and,
within an epoch, every stream token but the short tail is an input exactly once.
Documents run across window edges; `doc_ids` lets attention keep them apart. With
`mask_doc_ends`, the target of each document's last token (the next document's first
token, which nothing in the document predicts) is IGNORE_TARGET, which the loss skips.

Shapes: B windows in a batch, S = seq_len.
"""

from __future__ import annotations

import numpy as np
import torch

from sparsetron.train.data.errors import DataError

__all__ = ["IGNORE_TARGET", "PackedDataset", "split_train_val"]

# torch.nn.functional.cross_entropy's default ignore_index: such targets add no loss.
IGNORE_TARGET = -100


class PackedDataset:
    """Fixed windows of seq_len+1 tokens at stride seq_len over one document stream.

    tokens: [N] ids (any integer dtype; a read-only memmap is fine, it is only indexed).
    doc_starts: [D] sorted start offset of each document, doc_starts[0] == 0.
    """

    def __init__(self, tokens: np.ndarray, doc_starts: np.ndarray, seq_len: int, mask_doc_ends: bool = False):
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        self.tokens = tokens
        self.doc_starts = np.asarray(doc_starts, dtype=np.int64)
        self.seq_len = seq_len
        self.mask_doc_ends = mask_doc_ends
        if len(tokens) < seq_len + 1:
            raise DataError(f"{len(tokens)} tokens cannot fill one window of seq_len+1 = {seq_len + 1} tokens")
        if len(self.doc_starts) == 0 or self.doc_starts[0] != 0:
            raise DataError("doc_starts must begin with 0")
        self.n_windows = (len(tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self.n_windows

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def n_documents(self) -> int:
        return len(self.doc_starts)

    def gather(self, indices: np.ndarray | list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Windows `indices` as int64 arrays (inputs_BS, targets_BS, doc_ids_BS).

        One fancy index over the stream for the whole batch: on a memmap this reads
        only the pages the batch touches.
        """
        idx_B = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx_B) and (idx_B.min() < 0 or idx_B.max() >= self.n_windows):
            raise IndexError(f"window index out of range [0, {self.n_windows}): {idx_B.tolist()}")
        pos_BW = idx_B[:, None] * self.seq_len + np.arange(self.seq_len + 1, dtype=np.int64)
        win_BW = self.tokens[pos_BW].astype(np.int64)
        doc_BW = np.searchsorted(self.doc_starts, pos_BW, side="right") - 1
        # Copies, so callers may .view() them (a [:, :-1] slice cannot be) and masking the
        # targets cannot reach the inputs (one row's [:, 1:] slice is already contiguous).
        targets_BS = win_BW[:, 1:].copy()
        if self.mask_doc_ends:
            targets_BS[doc_BW[:, 1:] != doc_BW[:, :-1]] = IGNORE_TARGET
        # The document of each input token, renumbered from 0 at the window's first token.
        doc_BS = doc_BW[:, :-1] - doc_BW[:, :1]
        return np.ascontiguousarray(win_BW[:, :-1]), targets_BS, np.ascontiguousarray(doc_BS)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs [S], targets [S], doc_ids [S]), all int64."""
        if not -self.n_windows <= i < self.n_windows:
            raise IndexError(f"window {i} out of range for {self.n_windows} windows")
        inputs, targets, doc_ids = self.gather([i % self.n_windows])
        return torch.from_numpy(inputs[0]), torch.from_numpy(targets[0]), torch.from_numpy(doc_ids[0])


def split_train_val(
    tokens: np.ndarray, doc_starts: np.ndarray, seq_len: int, val_fraction: float, mask_doc_ends: bool = False
) -> tuple[PackedDataset, PackedDataset]:
    """Hold out the last documents for validation; both splits are whole documents.

    Validation gets round(val_fraction * D) documents, at least one, and more if that
    is needed for one full window (else evaluation would have nothing to read). The
    training split must keep at least one window.
    """
    doc_starts = np.asarray(doc_starts, dtype=np.int64)
    n_docs, n_tokens = len(doc_starts), len(tokens)
    if n_docs < 2:
        raise DataError(f"need at least 2 documents to split off validation data, got {n_docs}")
    n_val = max(1, round(val_fraction * n_docs))
    # Fewest trailing documents holding seq_len+1 tokens (tail_tokens grows with k).
    tail_tokens = n_tokens - doc_starts[::-1]  # [D], entry k-1 = tokens in the last k docs
    enough = np.nonzero(tail_tokens >= seq_len + 1)[0]
    if len(enough) == 0:
        raise DataError(f"{n_tokens} tokens in all: not enough for one window of seq_len+1 = {seq_len + 1}")
    n_val = max(n_val, int(enough[0]) + 1)
    if n_val >= n_docs:
        raise DataError(
            f"no documents left for training: validation needs the last {n_val} of {n_docs} documents "
            f"to fill one window of seq_len+1 = {seq_len + 1} tokens ({n_tokens} tokens in all)"
        )
    cut = int(doc_starts[n_docs - n_val])
    if cut < seq_len + 1:
        raise DataError(
            f"training split too small: {cut} tokens in {n_docs - n_val} documents cannot fill one window "
            f"of seq_len+1 = {seq_len + 1} tokens (validation holds {n_tokens - cut} tokens in {n_val} documents)"
        )
    train = PackedDataset(tokens[:cut], doc_starts[: n_docs - n_val], seq_len, mask_doc_ends)
    val = PackedDataset(tokens[cut:], doc_starts[n_docs - n_val :] - cut, seq_len, mask_doc_ends)
    return train, val
