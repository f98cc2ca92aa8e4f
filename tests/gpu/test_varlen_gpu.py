"""Document-masked attention on CUDA: FlashAttention's varlen kernel (`kernels.varlen`) against
the fp64 dense-mask reference, output and gradients, per element within a few times torch's own
error at the dtype (the dense-mask SDPA run at that dtype), and the model's packed batches.

Shape legend: B rows, S positions, H query heads, K key/value heads, d head dim.
"""

import pytest
import torch
from tolerance import assert_within_dtype_error

from sparsetron.kernels.varlen import document_attention_reference, flash_varlen_available, varlen_attention
from sparsetron.model.sequence import SequenceInfo

pytestmark = pytest.mark.gpu


def documents(B, S, mean_len, seed):
    g = torch.Generator().manual_seed(seed)
    # Random document boundaries, including documents of one token.
    return (torch.rand(B, S, generator=g) < 1 / mean_len).long().cumsum(1).cuda()


def outputs_and_grads(fn, q, k, v, do, dtype):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    o = fn(q, k, v)
    o.backward(do.to(dtype))
    return [t.double() for t in (o, q.grad, k.grad, v.grad)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, S, H, K, d, mean_len", [(2, 1000, 8, 8, 64, 150), (1, 4093, 16, 4, 128, 700)])
def test_varlen_equals_the_dense_mask_reference(dtype, B, S, H, K, d, mean_len):
    assert flash_varlen_available("cuda", dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, do = (torch.randn(B, S, H, d, generator=g, device="cuda", dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(B, S, K, d, generator=g, device="cuda", dtype=torch.float64) for _ in range(2))
    doc_ids = documents(B, S, mean_len, 1)
    seq = SequenceInfo.build(B, S, doc_ids)
    assert seq.cu_seqlens_N.numel() > 2 * B  # several documents per row

    def flash(q, k, v):
        return varlen_attention(q, k, v, doc_ids, seq.cu_seqlens_N, seq.max_seqlen)

    def dense(q, k, v):
        return document_attention_reference(q, k, v, doc_ids)

    exact = outputs_and_grads(dense, q, k, v, do, torch.float64)
    torch_at_dtype = outputs_and_grads(dense, q, k, v, do, dtype)
    got = outputs_and_grads(flash, q, k, v, do, dtype)
    for name, g_, e, t in zip(("o", "dq", "dk", "dv"), got, exact, torch_at_dtype, strict=True):
        assert_within_dtype_error(name, g_, e, t)


def test_varlen_uses_less_memory_than_the_dense_mask_at_16k():
    B, S, H, K, d = 1, 16384, 16, 4, 128
    q = torch.randn(B, S, H, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, S, K, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    doc_ids = documents(B, S, 2000, 2)
    seq = SequenceInfo.build(B, S, doc_ids)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    varlen_attention(q, k, v, doc_ids, seq.cu_seqlens_N, seq.max_seqlen)
    extra = torch.cuda.max_memory_allocated() - base
    # The output and the softmax statistics; the dense path's boolean mask alone is S^2 bytes (256 MiB).
    assert extra < 4 * q.numel() * q.element_size(), extra


@pytest.mark.parametrize("masked", [True, False])
def test_context_shard_chunks_equal_the_reference(masked):
    """Context parallelism's chunks: a chunk's queries against the keys before its end, with
    separate query and key layouts (bottom-right causal alignment), in bf16 against fp64."""
    from sparsetron.model.attention_ops import full_attention
    from sparsetron.model.sequence_shard import shard_sequence

    B, S, H, K, d, cp = 2, 2048, 8, 2, 64, 4
    g = torch.Generator(device="cuda").manual_seed(3)
    q, do = (torch.randn(B, S, H, d, generator=g, device="cuda", dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(B, S, K, d, generator=g, device="cuda", dtype=torch.float64) for _ in range(2))
    doc_ids = documents(B, S, 300, 4) if masked else None
    whole = SequenceInfo.build(B, S, doc_ids)
    for rank in range(cp):
        seq = shard_sequence(whole, rank, cp)
        index = seq.context.index_S

        def shard(q_, k_, v_, seq=seq, index=index):
            return full_attention(q_[:, index], k_, v_, seq)

        def dense(q_, k_, v_, index=index):
            return document_attention_reference(q_, k_, v_, doc_ids)[:, index]

        exact = outputs_and_grads(dense, q, k, v, do[:, index], torch.float64)
        torch_at_dtype = outputs_and_grads(dense, q, k, v, do[:, index], torch.bfloat16)
        got = outputs_and_grads(shard, q, k, v, do[:, index], torch.bfloat16)
        for name, g_, e, t in zip(("o", "dq", "dk", "dv"), got, exact, torch_at_dtype, strict=True):
            assert_within_dtype_error(f"rank {rank} {name}", g_, e, t)
