"""A context-parallel rank's share of a batch's sequences: which positions it holds, and what
its queries need to see.

Context parallelism splits every row of S positions over `ranks` ranks in the load-balanced
head-tail ("zigzag") order: the row is cut into 2 x ranks chunks of C = S / (2 ranks)
positions, and rank r holds chunks r and 2 ranks - 1 - r, in that order. Under causal
attention chunk c costs c + 1/2 chunks of keys, so every rank gets the same work
(r + 1/2 + 2 ranks - 1 - r + 1/2 = 2 ranks).

`shard_sequence` turns the whole batch's `SequenceInfo` (built once, on the whole sequence,
before any sharding) into the rank's: rotary positions of its own tokens, and a `ContextShard`
holding the whole description and one `QueryChunk` per chunk. A chunk's queries (positions
[g0, g1) of every row) see the keys [0, g1) of their row: packed as FlashAttention's varlen
layout with separate query and key sequences, one per (row, document) that meets [0, g1), a
document's queries the last ones of its keys (bottom-right causal alignment). Documents are
those of the whole row, so positions restart and no query sees another document, across
chunk and rank boundaries alike. Nothing here needs a process group (`parallel.context_parallel`
moves the tensors).

Shape legend: B rows, S positions per row, C positions per chunk, N sequences (row pieces).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sparsetron.model.sequence import document_starts

if TYPE_CHECKING:
    from sparsetron.model.sequence import SequenceInfo


def zigzag_index(seq_len: int, rank: int, ranks: int, device=None) -> torch.Tensor:
    """int64 [S / ranks]: the positions of a row that `rank` of `ranks` holds, in its local order."""
    if seq_len % (2 * ranks):
        raise ValueError(f"sequence length {seq_len} must be divisible by 2 x context ranks = {2 * ranks}")
    if not 0 <= rank < ranks:
        raise ValueError(f"rank {rank} is not one of {ranks} context ranks")
    C = seq_len // (2 * ranks)
    head = torch.arange(rank * C, (rank + 1) * C, device=device)
    tail = torch.arange((2 * ranks - 1 - rank) * C, (2 * ranks - rank) * C, device=device)
    return torch.cat([head, tail])


def zigzag_order(seq_len: int, ranks: int, device=None) -> torch.Tensor:
    """int64 [S]: every rank's positions, rank after rank (what a gather over the ranks holds)."""
    return torch.cat([zigzag_index(seq_len, r, ranks, device) for r in range(ranks)])


@dataclass
class QueryChunk:
    """A run of a rank's queries: local positions [local_start, local_start + length) are the
    global positions [global_start, global_start + length) of every row."""

    local_start: int
    global_start: int
    length: int
    cu_seqlens_q: torch.Tensor
    """int32 [N + 1]: the chunk's queries of every row ([B * C] packed) cut into sequences."""
    cu_seqlens_k: torch.Tensor
    """int32 [N + 1]: the keys [0, global_end) of every row ([B * global_end] packed), cut alike."""
    max_seqlen_q: int
    max_seqlen_k: int

    @property
    def global_end(self) -> int:
        return self.global_start + self.length


@dataclass
class ContextShard:
    """What a context-parallel rank's attention needs beyond its own tokens."""

    whole: SequenceInfo
    """The batch's whole sequences (Ulysses attention runs on them)."""
    ranks: int
    index_S: torch.Tensor
    """int64 [S / ranks]: the global position of each local position."""
    order_S: torch.Tensor
    """int64 [S]: the global positions of every rank's tokens, rank after rank (`zigzag_order`)."""
    natural_S: torch.Tensor
    """int64 [S]: where each global position lies in that rank-after-rank order (order_S's inverse)."""
    chunks: tuple[QueryChunk, ...]


def _query_chunk(whole: SequenceInfo, local_start: int, global_start: int, length: int) -> QueryChunk:
    """The varlen layout of one chunk's queries against the keys before its end (module docstring)."""
    B, end = whole.batch_size, global_start + length
    device = whole.positions_BS.device
    if whole.doc_ids_BS is None:
        starts_BE = torch.zeros(B, end, dtype=torch.bool, device=device)
        starts_BE[:, 0] = True
    else:
        starts_BE = document_starts(whole.doc_ids_BS[:, :end])
    starts_T = starts_BE.flatten()
    seq_T = starts_T.cumsum(0) - 1  # the sequence (row piece) of every key
    N = int(starts_T.sum())  # a host synchronisation, once per chunk and batch
    keys_N = torch.bincount(seq_T, minlength=N)
    is_query_T = (torch.arange(end, device=device) >= global_start).repeat(B)
    queries_N = torch.bincount(seq_T[is_query_T], minlength=N)
    zero = keys_N.new_zeros(1)
    cu_k = torch.cat([zero, keys_N.cumsum(0)]).to(torch.int32)
    cu_q = torch.cat([zero, queries_N.cumsum(0)]).to(torch.int32)
    max_q, max_k = torch.stack([queries_N.max(), keys_N.max()]).tolist()
    return QueryChunk(local_start, global_start, length, cu_q, cu_k, max_q, max_k)


def shard_sequence(whole: SequenceInfo, rank: int, ranks: int) -> SequenceInfo:
    """`rank`'s share of `whole` among `ranks` context ranks: positions of its tokens, the whole
    documents (doc_ids, cu_seqlens, max_seqlen stay those of the whole batch), its `ContextShard`."""
    from sparsetron.model.sequence import SequenceInfo

    S = whole.seq_len
    device = whole.positions_BS.device
    index_S = zigzag_index(S, rank, ranks, device)
    C = S // (2 * ranks)
    chunks = (
        _query_chunk(whole, 0, rank * C, C),
        _query_chunk(whole, C, (2 * ranks - 1 - rank) * C, C),
    )
    order_S = zigzag_order(S, ranks, device)
    shard = ContextShard(whole, ranks, index_S, order_S, torch.argsort(order_S), chunks)
    mtp = whole.mtp.shard(index_S, ranks) if whole.mtp is not None else None
    return SequenceInfo(
        whole.positions_BS[:, index_S], whole.doc_ids_BS, whole.cu_seqlens_N, whole.max_seqlen, shard, mtp
    )
