"""What attention needs to know about a batch's sequences, computed once per batch.

A row of a batch holds one sequence, or, with attention.document_masking, several packed
documents (a document is a run of equal ids in `doc_ids`, as the data pipeline packs them).
`SequenceInfo.build` derives, on the whole sequence before any sharding (tensor/sequence or
context parallelism split it afterwards, pipeline stages each receive it):

- rotary positions (restarting at each document when masking),
- the document ids (None when a row is one sequence: attention is then plain causal),
- cu_seqlens: the batch as packed variable-length sequences (FlashAttention's layout), what
  varlen attention and MoBA take,
- the longest document, which varlen kernels size their grids by.

A training step adds the multi-token prediction targets (`mtp`, model/mtp.py): built on the whole
sequence too, and sharded and handed to every stage with the rest.

Context parallelism gives each rank a share of every row (`model.sequence_shard.shard_sequence`):
its SequenceInfo holds the rotary positions of its own tokens and a `ContextShard` (`context`)
with the whole description; doc_ids, cu_seqlens and max_seqlen stay those of the whole batch.

Documents need a host synchronisation (their number sizes cu_seqlens); it happens here, once
per batch, not in every layer or pipeline stage.

Shape legend: B rows, S positions per row, N sequences (documents) in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sparsetron.model.mtp import MTPTargets
    from sparsetron.model.sequence_shard import ContextShard


def positions_from_doc_ids(doc_ids_BS: torch.Tensor) -> torch.Tensor:
    """Position of each token within its document: 0 at a row's start and wherever the id changes."""
    B, S = doc_ids_BS.shape
    idx_BS = torch.arange(S, device=doc_ids_BS.device).expand(B, S)
    starts_BS = document_starts(doc_ids_BS)
    # The running maximum of start indices is, at each token, where its document began.
    start_idx_BS = torch.where(starts_BS, idx_BS, torch.zeros_like(idx_BS)).cummax(dim=1).values
    return idx_BS - start_idx_BS


def document_starts(doc_ids_BS: torch.Tensor) -> torch.Tensor:
    """Boolean [B, S]: a document starts here (every row's first token, and where the id changes)."""
    starts_BS = torch.ones_like(doc_ids_BS, dtype=torch.bool)
    starts_BS[:, 1:] = doc_ids_BS[:, 1:] != doc_ids_BS[:, :-1]
    return starts_BS


@dataclass
class SequenceInfo:
    """One batch's sequences: see the module docstring. Build it with `SequenceInfo.build`."""

    positions_BS: torch.Tensor
    """Rotary position of every token, int64 [B, S]."""
    doc_ids_BS: torch.Tensor | None
    """Document of every token when rows hold packed documents and attention masks them, else None."""
    cu_seqlens_N: torch.Tensor
    """int32 [N + 1]: where each sequence (document, or row) starts in the flattened batch, then B * S."""
    max_seqlen: int
    """The longest sequence (document, or row) in the batch."""
    context: ContextShard | None = None
    """This rank's share of the whole sequences under context parallelism (positions_BS are then its
    tokens' only), else None."""
    mtp: MTPTargets | None = None
    """A training step's multi-token prediction inputs and targets (model/mtp.py), sharded like the
    positions; None otherwise (evaluation, generation, models without MTP)."""

    @classmethod
    def build(
        cls, batch_size: int, seq_len: int, doc_ids_BS: torch.Tensor | None = None, *, device=None
    ) -> SequenceInfo:
        """For rows of `seq_len` tokens; `doc_ids_BS` (when given) splits rows into documents.

        Pass doc_ids only when documents are masked (attention.document_masking): without them,
        each row is one sequence and positions run 0..S-1.
        """
        B, S = batch_size, seq_len
        if doc_ids_BS is None:
            positions_BS = torch.arange(S, device=device).expand(B, S)
            cu_seqlens_N = torch.arange(0, B * S + 1, S, dtype=torch.int32, device=device)
            return cls(positions_BS, None, cu_seqlens_N, S)
        if doc_ids_BS.shape != (B, S):
            raise ValueError(f"doc_ids has shape {tuple(doc_ids_BS.shape)}, expected ({B}, {S})")
        starts_N = document_starts(doc_ids_BS).flatten().nonzero().squeeze(1)
        end_1 = torch.full((1,), B * S, dtype=starts_N.dtype, device=starts_N.device)
        cu_seqlens_N = torch.cat([starts_N, end_1]).to(torch.int32)
        # The batch's host synchronisation (see the module docstring).
        max_seqlen = int((cu_seqlens_N[1:] - cu_seqlens_N[:-1]).max())
        return cls(positions_from_doc_ids(doc_ids_BS), doc_ids_BS, cu_seqlens_N, max_seqlen)

    @property
    def batch_size(self) -> int:
        return self.positions_BS.shape[0]

    @property
    def seq_len(self) -> int:
        return self.positions_BS.shape[1]

    def to(self, device: torch.device | str) -> SequenceInfo:
        if self.context is not None:
            raise ValueError("move the whole SequenceInfo, then shard it (model.sequence_shard.shard_sequence)")
        doc_ids = self.doc_ids_BS.to(device) if self.doc_ids_BS is not None else None
        mtp = self.mtp.to(device) if self.mtp is not None else None
        return SequenceInfo(
            self.positions_BS.to(device), doc_ids, self.cu_seqlens_N.to(device), self.max_seqlen, mtp=mtp
        )
