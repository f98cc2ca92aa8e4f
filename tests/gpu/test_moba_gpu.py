"""The MoBA Triton kernels compiled for the GPU: bf16/fp16/fp32 at larger shapes, determinism,
CUDA-graph capture and memory. Run: pytest -m gpu tests/gpu/test_moba_gpu.py.

Shape legend: T packed tokens, Hq/Hkv heads, D head dim, B block size, K blocks per query.
"""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from moba_tolerance import masked_sdpa
from tolerance import allowed_error, assert_within_dtype_error

from sparsetron.kernels.moba import moba_attention, moba_reference, moba_selection

pytestmark = pytest.mark.gpu


def packed(lengths, hq, hkv, d, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    T = sum(lengths)
    q, k, v, do = (torch.randn(T, h, d, generator=g, device="cuda") for h in (hq, hkv, hkv, hq))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    return q, k, v, do, cu


def output_and_grads(fn, q, k, v, do, cu, block_size, topk, dtype):
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    o = fn(q, k, v, cu, block_size, topk)
    return (o, *torch.autograd.grad(o, (q, k, v), do.to(dtype)))


@pytest.mark.parametrize(
    "lengths, hq, hkv, d, block_size, topk, dtype",
    [
        ([4096], 4, 4, 128, 512, 3, torch.bfloat16),
        ([3000, 1111, 77, 2500], 8, 2, 64, 256, 3, torch.float16),  # GQA 4, partial blocks, a short doc
        ([8192], 4, 1, 128, 64, 8, torch.bfloat16),  # small blocks: many lists, many tiles
        ([6000, 300], 2, 2, 128, 4096, 12, torch.bfloat16),  # B = 4096 with a partial last block
        ([5000], 4, 2, 64, 128, 1, torch.bfloat16),  # K = 1: block-diagonal
        ([3333], 4, 2, 128, 128, 4, torch.float32),
    ],
)
def test_kernels_equal_reference(lengths, hq, hkv, d, block_size, topk, dtype):
    q, k, v, do, cu = packed(lengths, hq, hkv, d)
    # The reference routes on the same rounded inputs, so every contender picks the same blocks.
    rounded = [x.to(dtype).double() for x in (q, k, v, do)]
    exact = output_and_grads(moba_reference, *rounded, cu, block_size, topk, torch.float64)
    # torch's own attention at the dtype: SDPA under the dense selection mask.
    torch_dtype = output_and_grads(masked_sdpa, *rounded, cu, block_size, topk, dtype)
    kernel = output_and_grads(moba_attention, q, k, v, do, cu, block_size, topk, dtype)
    for name, ours, theirs, truth in zip(("o", "dq", "dk", "dv"), kernel, torch_dtype, exact, strict=True):
        assert ours.dtype == dtype, name
        assert_within_dtype_error(name, ours, truth, theirs)


def cut_suffix(q_full, do_full, cu_k, lq):
    """The last lq[s] rows of each sequence s of q_full / do_full (split by cu_k): q, do, cu_q,
    those rows' indices, and do_full zero elsewhere (so that dk and dv of the full sequences come
    from these rows' outputs only)."""
    ends = cu_k[1:].tolist()
    rows = torch.cat([torch.arange(end - n, end, device=q_full.device) for n, end in zip(lq, ends, strict=True)])
    cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32, device=q_full.device)
    do = do_full[rows]
    return q_full[rows], do, cu_q, rows, torch.zeros_like(do_full).index_copy_(0, rows, do)


@pytest.mark.parametrize(
    "pairs, hq, hkv, d, block_size, topk, dtype",
    [
        # A context-parallel rank's chunk [4096, 6144) of a packed row: a document that ended before
        # it, one straddling its start, one inside it, one running past its end.
        ([(0, 1500), (2100, 3000), (1000, 1000), (948, 948)], 8, 2, 128, 512, 3, torch.bfloat16),
        ([(777, 8192)], 4, 1, 128, 64, 8, torch.bfloat16),  # small blocks, queries from mid-block
        ([(300, 5000), (45, 45), (0, 77)], 4, 4, 64, 128, 1, torch.bfloat16),  # K = 1: block-diagonal
        ([(1000, 3333), (20, 100)], 4, 2, 128, 128, 12, torch.float16),  # K beyond a short document's blocks
        ([(1000, 3333)], 4, 2, 128, 128, 4, torch.float32),
    ],
)
def test_suffix_queries_equal_reference(pairs, hq, hkv, d, block_size, topk, dtype):
    """Queries that are the last Lq of their Lk keys (cu_seqlens_k): against the fp64 reference,
    within torch's own error, which is SDPA at the dtype on the full sequences (a query at every
    key) read at the suffix rows."""
    lq, lk = zip(*pairs, strict=True)
    q_full, k, v, do_full, cu_k = packed(lk, hq, hkv, d)
    q, do, cu_q, rows, do_full = cut_suffix(q_full, do_full, cu_k, lq)
    rounded = [x.to(dtype).double() for x in (q, k, v, do)]
    exact = output_and_grads(
        partial(moba_reference, cu_seqlens_k=cu_k), *rounded, cu_q, block_size, topk, torch.float64
    )
    full = [x.to(dtype).double() for x in (q_full, k, v, do_full)]
    torch_full = output_and_grads(masked_sdpa, *full, cu_k, block_size, topk, dtype)
    torch_dtype = (torch_full[0][rows], torch_full[1][rows], *torch_full[2:])
    kernel = output_and_grads(partial(moba_attention, cu_seqlens_k=cu_k), q, k, v, do, cu_q, block_size, topk, dtype)
    for name, ours, theirs, truth in zip(("o", "dq", "dk", "dv"), kernel, torch_dtype, exact, strict=True):
        assert ours.dtype == dtype, name
        # A document's first query reads one key: its dq is exactly 0, a row with no scale of its
        # own (torch's rounding there would let any error pass), held to the tensor's scale instead.
        some = truth.abs().amax(-1) > 0
        assert_within_dtype_error(name, ours[some], truth[some], theirs[some])
        zero_rows = ours.masked_fill(some[..., None], 0).abs().max().item()
        assert zero_rows <= allowed_error(theirs[some], truth[some]) * truth.abs().max().item(), name


def test_long_sequence_within_k_blocks_is_full_causal_attention():
    q, k, v, _, cu = packed([12288], 16, 4, 128)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    o = moba_attention(q, k, v, cu, 4096, 3)

    def causal(dtype):
        q_HSD, k_HSD, v_HSD = (x.transpose(0, 1).to(dtype) for x in (q, k, v))
        return F.scaled_dot_product_attention(q_HSD, k_HSD, v_HSD, is_causal=True, enable_gqa=True).transpose(0, 1)

    # fp32 stands in for fp64 (the fp64 scores at 12K would take 19 GB): its error is ~2^16 below bf16's.
    assert_within_dtype_error("o", o, causal(torch.float32), causal(torch.bfloat16))


def test_attention_sink_matches_reference_and_is_deterministic():
    """Every query routes to block 0 (its keys and the queries share a direction): the dk/dv of
    that block come from 8 chunks of routed queries (dkdv.py) reduced in order, bitwise stable."""
    lengths, hq, hkv, d, block_size, topk, dtype = [8192], 8, 2, 128, 128, 3, torch.bfloat16
    q, k, v, do, cu = packed(lengths, hq, hkv, d, seed=5)
    w = F.normalize(torch.randn(d, device="cuda", generator=torch.Generator(device="cuda").manual_seed(6)), dim=0)
    q += 4 * w
    k[:block_size] += 8 * w
    rounded = [x.to(dtype).double() for x in (q, k, v, do)]
    chosen_HLn = moba_selection(rounded[0], rounded[1].repeat_interleave(hq // hkv, 1), block_size, topk)
    assert chosen_HLn[:, block_size:, 0].all()
    exact = output_and_grads(moba_reference, *rounded, cu, block_size, topk, torch.float64)
    torch_dtype = output_and_grads(masked_sdpa, *rounded, cu, block_size, topk, dtype)
    kernel = output_and_grads(moba_attention, q, k, v, do, cu, block_size, topk, dtype)
    for name, ours, theirs, truth in zip(("o", "dq", "dk", "dv"), kernel, torch_dtype, exact, strict=True):
        assert_within_dtype_error(name, ours, truth, theirs)
    again = output_and_grads(moba_attention, q, k, v, do, cu, block_size, topk, dtype)
    for a, b in zip(kernel, again, strict=True):
        assert torch.equal(a, b)


def test_backward_is_deterministic():
    q, k, v, do, cu = packed([20000, 4000], 8, 2, 128, seed=1)
    first = output_and_grads(moba_attention, q, k, v, do, cu, 512, 3, torch.bfloat16)
    second = output_and_grads(moba_attention, q, k, v, do, cu, 512, 3, torch.bfloat16)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("lq", [None, (1000, 2192)])
def test_captured_in_a_cuda_graph(lq):
    """No host synchronization: forward and backward replay from a graph on new data (with
    queries that are all the keys, or the last lq of each sequence's keys)."""

    def inputs(seed):
        q, k, v, do, cu = packed([5000, 3192], 4, 2, 128, seed=seed)
        if lq is None:
            return q, k, v, do, cu, None
        q, do, cu_q, _, _ = cut_suffix(q, do, cu, lq)
        return q, k, v, do, cu_q, cu

    q, k, v, do, cu, cu_k = inputs(2)
    static = [x.bfloat16().requires_grad_() for x in (q, k, v)]
    static_do = do.bfloat16()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compiles the kernels) outside the capture
        o = moba_attention(*static, cu, 512, 3, cu_k)
        torch.autograd.grad(o, static, static_do)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o = moba_attention(*static, cu, 512, 3, cu_k)
        grads = torch.autograd.grad(o, static, static_do)
    fresh = inputs(3)
    for dst, src in zip(static, fresh[:3], strict=True):
        dst.data.copy_(src)
    static_do.copy_(fresh[3])
    graph.replay()
    eager = output_and_grads(partial(moba_attention, cu_seqlens_k=cu_k), *fresh[:5], 512, 3, torch.bfloat16)
    for a, b in zip((o, *grads), eager, strict=True):
        assert torch.equal(a, b)


def test_memory_stays_linear_in_tokens():
    """At 64K tokens in blocks of 64, the fp32 [n_blocks, H, T] gate alone would be 4 GiB; the
    op needs less than half: its outputs, one fp32 state per query for the routed blocks, and
    index arrays of the routed entries."""
    T, H, D, block_size, topk = 65536, 16, 128, 64, 3
    q, k, v, do, cu = packed([T], H, H, D, seed=4)
    q, k, v, do = (x.bfloat16() for x in (q, k, v, do))
    q.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    o = moba_attention(q, k, v, cu, block_size, topk)
    torch.autograd.grad(o, q, do)
    extra = torch.cuda.max_memory_allocated() - base
    entries = T * H * (topk - 1)
    # o, dq, dk, dv (4 x q), the fp32 routed state of the forward or the backward (2 x q), the dk/dv
    # partials of long routed lists (8 bytes x k / split = 1 x k in bf16), 64 bytes per entry.
    bound = 7 * q.numel() * q.element_size() + 64 * entries
    gate_bytes = (T // block_size) * H * T * 4
    assert extra <= bound < gate_bytes / 2, (extra, bound, gate_bytes)


def test_model_runs_the_kernels_as_the_cpu_runs_the_reference():
    """A MoBA model with packed documents: logits and gradients on CUDA (Triton kernels, fp32)
    equal the same weights on the CPU (the reference)."""
    import copy

    from sparsetron.model.config import AttentionConfig, ModelConfig
    from sparsetron.model.transformer import Transformer

    model_cfg = ModelConfig(vocab_size=101, dim=128, n_layers=2, ffn_hidden=256, max_seq_len=2048)
    attn_cfg = AttentionConfig(n_heads=4, n_kv_heads=2, backend="moba", moba_block_size=128, moba_topk=3)
    attn_cfg.validate(model_cfg)
    torch.manual_seed(0)
    cpu_model = Transformer(model_cfg, attn_cfg)
    cpu_model.init_weights()
    gpu_model = copy.deepcopy(cpu_model).cuda()
    tokens_BS = torch.randint(0, 101, (2, 2000))
    doc_ids_BS = torch.zeros(2, 2000, dtype=torch.long)
    doc_ids_BS[0, 1500:] = 1
    doc_ids_BS[1, 333:] = 1
    doc_ids_BS[1, 1900:] = 2
    results = []
    for model, device in ((cpu_model, "cpu"), (gpu_model, "cuda")):
        tokens = tokens_BS.to(device)
        logits = model(tokens, model.sequence_info(tokens, doc_ids_BS.to(device)))
        logits.float().pow(2).mean().backward()
        results.append((logits.detach().cpu(), model.layers["0"].attention.wq.weight.grad.cpu()))
    for ours, theirs in zip(results[1], results[0], strict=True):
        assert (ours - theirs).abs().max().item() <= 1e-4 * theirs.abs().max().item()
