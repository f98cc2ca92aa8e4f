"""SequenceInfo: positions, documents, cu_seqlens and the longest document of a batch, against
loops written out here."""

import pytest
import torch

from sparsetron.model.sequence import SequenceInfo, positions_from_doc_ids


def test_positions_from_doc_ids_examples():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5], [3, 4, 4, 4, 9, 9]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5], [0, 0, 1, 2, 0, 1]])
    assert torch.equal(positions_from_doc_ids(doc_ids), expected)


def test_positions_from_doc_ids_random_rows_against_a_loop():
    g = torch.Generator().manual_seed(6)
    B, S = 4, 37
    # Random document boundaries; ids increase along the row.
    doc_ids = (torch.rand(B, S, generator=g) < 0.15).long().cumsum(1) + 3
    out = positions_from_doc_ids(doc_ids)
    for b in range(B):
        pos = 0
        for s in range(S):
            pos = 0 if s == 0 or doc_ids[b, s] != doc_ids[b, s - 1] else pos + 1
            assert out[b, s] == pos


def random_doc_ids(B, S, seed, p=0.15):
    g = torch.Generator().manual_seed(seed)
    # Random document boundaries; ids increase along a row, and a row may reuse the previous row's id.
    return (torch.rand(B, S, generator=g) < p).long().cumsum(1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_documents_against_a_loop(seed):
    B, S = 3, 29
    doc_ids = random_doc_ids(B, S, seed)
    doc_ids[1] = doc_ids[0, -1]  # row 1 is one document with the id row 0 ends on: still a new sequence
    seq = SequenceInfo.build(B, S, doc_ids)
    lengths = []
    for b in range(B):
        for s in range(S):
            if s == 0 or doc_ids[b, s] != doc_ids[b, s - 1]:
                lengths.append(0)
            lengths[-1] += 1
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    assert seq.cu_seqlens_N.dtype == torch.int32 and seq.cu_seqlens_N.tolist() == cu
    assert seq.max_seqlen == max(lengths)
    assert torch.equal(seq.positions_BS, positions_from_doc_ids(doc_ids))
    assert seq.doc_ids_BS is doc_ids
    assert (seq.batch_size, seq.seq_len) == (B, S)


def test_rows_without_documents():
    seq = SequenceInfo.build(2, 5)
    assert seq.doc_ids_BS is None and seq.max_seqlen == 5
    assert seq.cu_seqlens_N.tolist() == [0, 5, 10]
    assert torch.equal(seq.positions_BS, torch.arange(5).expand(2, 5))


def test_examples_and_bad_shape():
    seq = SequenceInfo.build(2, 5, torch.tensor([[3, 3, 4, 4, 4], [7, 7, 7, 7, 9]]))
    assert seq.cu_seqlens_N.tolist() == [0, 2, 5, 9, 10] and seq.max_seqlen == 4
    with pytest.raises(ValueError, match=r"doc_ids has shape \(2, 4\), expected \(2, 5\)"):
        SequenceInfo.build(2, 5, torch.zeros(2, 4, dtype=torch.long))
