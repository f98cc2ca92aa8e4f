"""kernels.varlen on the CPU: the dense-mask reference against attention run document by
document, the fallback that runs it, and how the flash kernel is told to be causal on each torch.

Shape legend: B rows, S positions, H query heads, K key/value heads, d head dim.
"""

import pytest
import torch
import torch.nn.functional as F

from sparsetron.kernels.varlen import _signature, flash_varlen_available, varlen_attention
from sparsetron.model.sequence import SequenceInfo


def per_document(q_BSHd, k_BSKd, v_BSKd, doc_ids_BS):
    """Causal SDPA on each document alone, written out row by row."""
    out = torch.empty_like(q_BSHd)
    groups = q_BSHd.shape[2] // k_BSKd.shape[2]
    for b in range(q_BSHd.shape[0]):
        start = 0
        S = q_BSHd.shape[1]
        for s in range(1, S + 1):
            if s == S or doc_ids_BS[b, s] != doc_ids_BS[b, s - 1]:
                q, k, v = (t[b, start:s].transpose(0, 1) for t in (q_BSHd, k_BSKd, v_BSKd))
                k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
                out[b, start:s] = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1)
                start = s
    return out


@pytest.mark.parametrize("H, K", [(4, 4), (6, 2)])
def test_cpu_path_equals_attention_document_by_document(H, K):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    B, S, d = 3, 41, 16
    q = torch.randn(B, S, H, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, S, K, d, generator=g, dtype=torch.float64) for _ in range(2))
    doc_ids = (torch.rand(B, S, generator=g) < 0.1).long().cumsum(1)
    seq = SequenceInfo.build(B, S, doc_ids)
    out = varlen_attention(q, k, v, doc_ids, seq.cu_seqlens_N, seq.max_seqlen)
    torch.testing.assert_close(out, per_document(q, k, v, doc_ids), rtol=1e-12, atol=1e-12)
    # A mask that leaked across documents would read the previous one.
    joined = torch.zeros_like(doc_ids)
    assert (varlen_attention(q, k, v, joined, seq.cu_seqlens_N, seq.max_seqlen) - out).abs().max() > 1e-3


def test_flash_only_on_cuda_in_half_precision():
    assert not flash_varlen_available("cpu", torch.bfloat16)
    assert not flash_varlen_available("cuda", torch.float32)


def test_call_for_each_torch_signature():
    def current(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False):
        pass

    def torch_2_11(q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal=False):
        pass

    assert _signature(current) == ({"window_size": (-1, 0)}, True)
    assert _signature(torch_2_11) == ({"is_causal": True}, False)


@pytest.mark.parametrize("reads_gqa", [True, False])
def test_flash_call_is_formed_for_each_torch(monkeypatch, reads_gqa):
    """What varlen_attention hands torch's kernel (stubbed here: it runs on CUDA only)."""
    import torch.nn.attention.varlen as torch_varlen

    calls = []

    def stub(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
        calls.append((q.shape, k.shape, v.shape, cu_q, cu_k, max_q, max_k, kwargs))
        return torch.zeros_like(q)

    monkeypatch.setattr(torch_varlen, "varlen_attn", stub)
    monkeypatch.setattr("sparsetron.kernels.varlen.flash_varlen_available", lambda device_type, dtype: True)
    monkeypatch.setattr("sparsetron.kernels.varlen._signature", lambda fn: ({"is_causal": True}, reads_gqa))
    q = torch.randn(2, 5, 4, 8)
    k = torch.randn(2, 5, 2, 8)
    seq = SequenceInfo.build(2, 5, torch.tensor([[0, 0, 1, 1, 1], [2, 2, 2, 2, 2]]))
    out = varlen_attention(q, k, k, seq.doc_ids_BS, seq.cu_seqlens_N, seq.max_seqlen)
    assert out.shape == q.shape
    (q_shape, k_shape, v_shape, cu_q, cu_k, max_q, max_k, kwargs) = calls[0]
    assert q_shape == (10, 4, 8) and k_shape == v_shape == ((10, 2, 8) if reads_gqa else (10, 4, 8))
    assert cu_q is cu_k is seq.cu_seqlens_N and max_q == max_k == 5
    assert kwargs == ({"is_causal": True, "enable_gqa": True} if reads_gqa else {"is_causal": True})


def test_bad_shapes_are_refused():
    q = torch.randn(1, 8, 4, 16)
    k = torch.randn(1, 8, 3, 16)
    seq = SequenceInfo.build(1, 8)
    with pytest.raises(ValueError, match="K dividing H"):
        varlen_attention(q, k, k, torch.zeros(1, 8, dtype=torch.long), seq.cu_seqlens_N, 8)
