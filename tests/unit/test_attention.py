"""Attention against a naive fp64 softmax(QK^T / sqrt(d) + mask) V written out here.

Shape legend: B batch, S sequence, D dim, H query heads, K kv heads, d head dim.
"""

import math

import pytest
import torch

from sparsetron.kernels.varlen import document_causal_mask
from sparsetron.model.attention import Attention
from sparsetron.model.config import AttentionConfig, ModelConfig
from sparsetron.model.layers import rope_tables
from sparsetron.model.sequence import SequenceInfo
from sparsetron.model.transformer import Transformer

D = 48
MODEL = ModelConfig(vocab_size=64, dim=D, n_layers=2, ffn_hidden=64, max_seq_len=128)


def make_attention(n_heads=4, n_kv_heads=2, qk_norm=False, document_masking=True, seed=0, dtype=torch.float32):
    cfg = AttentionConfig(
        n_heads=n_heads, n_kv_heads=n_kv_heads, qk_norm=qk_norm, document_masking=document_masking, rope_theta=1000.0
    )
    cfg.validate(MODEL)
    attn = Attention(D, cfg, MODEL)
    torch.manual_seed(seed)
    # Unit-scale activations make the softmax far from uniform, so mistakes show.
    attn.init_weights(std=D**-0.5, out_std=D**-0.5)
    if qk_norm:
        with torch.no_grad():
            attn.q_norm.weight.normal_(1.0, 0.3)
            attn.k_norm.weight.normal_(1.0, 0.3)
    return attn.to(dtype)


def weights_of(attn, dtype=torch.float64):
    names = ["wq", "wk", "wv", "wo"]
    w = {n: getattr(attn, n).weight.detach().to(dtype).requires_grad_() for n in names}
    if attn.q_norm is not None:
        w["q_norm"] = attn.q_norm.weight.detach().to(dtype).requires_grad_()
        w["k_norm"] = attn.k_norm.weight.detach().to(dtype).requires_grad_()
    return w


def naive_attention(x_BSD, w, attn, positions_BS, doc_ids_BS):
    """Every step spelled out, in x's dtype; rope angles formed in fp64 then rounded."""
    B, S, _ = x_BSD.shape
    H, K, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = (x_BSD @ w["wq"].T).view(B, S, H, d)
    k = (x_BSD @ w["wk"].T).view(B, S, K, d)
    v = (x_BSD @ w["wv"].T).view(B, S, K, d)
    if "q_norm" in w:
        q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + MODEL.norm_eps) * w["q_norm"]
        k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + MODEL.norm_eps) * w["k_norm"]
    inv_freq = attn.rope_theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = positions_BS.double()[:, :, None, None] * inv_freq
    c, s = angle.cos().to(x_BSD.dtype), angle.sin().to(x_BSD.dtype)

    def rotate(t):
        a, b = t[..., : d // 2], t[..., d // 2 :]
        return torch.cat((a * c - b * s, b * c + a * s), dim=-1)

    q, k = rotate(q), rotate(k)
    # Query head h reads kv head h // (H / K).
    k = k.repeat_interleave(H // K, dim=2)
    v = v.repeat_interleave(H // K, dim=2)
    scores = torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(d)
    idx = torch.arange(S)
    allowed = idx[None, :] <= idx[:, None]
    if doc_ids_BS is not None:
        allowed = allowed & (doc_ids_BS[:, :, None] == doc_ids_BS[:, None, :])[:, None]
    p = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    o = torch.einsum("bhst,bthd->bshd", p, v).reshape(B, S, H * d)
    return o @ w["wo"].T


def run(attn, x_BSD, positions_BS, doc_ids_BS):
    """attn on x, with the batch described as the model describes it (checked against `positions_BS`)."""
    B, S, _ = x_BSD.shape
    seq = SequenceInfo.build(B, S, doc_ids_BS)
    assert torch.equal(seq.positions_BS, positions_BS.expand(B, S))
    return attn(x_BSD, seq)


def packed_batch(S=37, lengths=((11, 19, 7), (30, 2, 5))):
    """Rows of documents of uneven length, with positions restarting in each."""
    doc_ids = torch.stack([torch.repeat_interleave(torch.arange(len(r)) * 3 + 1, torch.tensor(r)) for r in lengths])
    positions = torch.cat([torch.cat([torch.arange(n) for n in r])[None] for r in lengths])
    assert doc_ids.shape[1] == S
    return doc_ids, positions


CASES = [
    pytest.param(4, 2, False, id="gqa"),
    pytest.param(4, 4, False, id="mha"),
    pytest.param(6, 1, True, id="mqa-qknorm"),
    pytest.param(4, 2, True, id="gqa-qknorm"),
]


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
@pytest.mark.parametrize("n_heads, n_kv_heads, qk_norm", CASES)
def test_attention_matches_naive_fp64(n_heads, n_kv_heads, qk_norm, packed):
    attn = make_attention(n_heads, n_kv_heads, qk_norm)
    g = torch.Generator().manual_seed(11)
    S = 37
    x = torch.randn(2, S, D, generator=g)
    if packed:
        doc_ids, positions = packed_batch(S)
    else:
        doc_ids, positions = None, torch.arange(S).expand(2, S)
    out = run(attn, x, positions, doc_ids)
    expected = naive_attention(x.double(), weights_of(attn), attn, positions, doc_ids)
    assert expected.abs().mean() > 0.1  # a real signal, not a near-zero output
    torch.testing.assert_close(out.double(), expected, rtol=2e-5, atol=2e-5)


def test_attention_bf16_error_comparable_to_naive_bf16():
    """At bf16 our error against fp64 stays within a small multiple of a naive bf16 computation's."""
    attn32 = make_attention(4, 2, True)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 37, D, generator=g)
    doc_ids, positions = packed_batch()
    truth = naive_attention(x.double(), weights_of(attn32), attn32, positions, doc_ids)
    naive_err = (
        (naive_attention(x.bfloat16(), weights_of(attn32, torch.bfloat16), attn32, positions, doc_ids).double() - truth)
        .abs()
        .max()
    )
    out = run(make_attention(4, 2, True, dtype=torch.bfloat16), x.bfloat16(), positions, doc_ids)
    assert out.dtype == torch.bfloat16
    err = (out.double() - truth).abs().max()
    assert err <= 2 * naive_err, (err, naive_err)


def test_attention_gradients_match_naive_fp64():
    attn = make_attention(4, 2, True)
    g = torch.Generator().manual_seed(13)
    x = torch.randn(2, 37, D, generator=g, requires_grad=True)
    grad_out = torch.randn(2, 37, D, generator=g)
    doc_ids, positions = packed_batch()
    run(attn, x, positions, doc_ids).backward(grad_out)

    w = weights_of(attn)
    x64 = x.detach().double().requires_grad_()
    naive_attention(x64, w, attn, positions, doc_ids).backward(grad_out.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    for name, ref in w.items():
        ours = getattr(attn, name).weight.grad
        assert ours.abs().max() > 0, name
        torch.testing.assert_close(ours.double(), ref.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_second_document_sees_nothing_of_the_first():
    attn = make_attention(4, 2, True)
    g = torch.Generator().manual_seed(14)
    len_a, len_b = 13, 24
    x_a, x_b = torch.randn(1, len_a, D, generator=g), torch.randn(1, len_b, D, generator=g)
    packed = torch.cat([x_a, x_b], dim=1)
    doc_ids = torch.tensor([[0] * len_a + [1] * len_b])
    positions = torch.cat([torch.arange(len_a), torch.arange(len_b)])[None]
    out_packed = run(attn, packed, positions, doc_ids)
    out_alone = run(attn, x_b, torch.arange(len_b)[None], None)
    torch.testing.assert_close(out_packed[:, len_a:], out_alone, rtol=1e-5, atol=1e-5)
    # Without masking, document B would read document A.
    unmasked = attn(packed, SequenceInfo(positions, None, torch.tensor([0, len_a + len_b], dtype=torch.int32), 37))
    assert (unmasked[:, len_a:] - out_alone).abs().max() > 1e-2


def test_single_document_mask_path_equals_causal_path():
    attn = make_attention(4, 2)
    x = torch.randn(3, 29, D)
    positions = torch.arange(29).expand(3, 29)
    one_doc = torch.full((3, 29), 7)
    torch.testing.assert_close(run(attn, x, positions, one_doc), run(attn, x, positions, None), rtol=1e-5, atol=1e-5)


def test_document_masking_off_ignores_doc_ids():
    cfg = AttentionConfig(n_heads=4, n_kv_heads=2, document_masking=False)
    with torch.device("meta"):
        model = Transformer(MODEL, cfg)
    tokens = torch.zeros(2, 37, dtype=torch.long)
    doc_ids, _ = packed_batch()
    seq = model.sequence_info(tokens, doc_ids)
    assert seq.doc_ids_BS is None and seq.max_seqlen == 37
    assert torch.equal(seq.positions_BS, torch.arange(37).expand(2, 37))
    assert seq.cu_seqlens_N.tolist() == [0, 37, 74]


def test_document_causal_mask_shape_and_content():
    mask = document_causal_mask(torch.tensor([[0, 0, 1, 1, 1]]))
    assert mask.shape == (1, 1, 5, 5) and mask.dtype == torch.bool
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(mask[0, 0], expected)


def test_meta_build_then_init_recomputes_rope_buffers():
    cfg = AttentionConfig(n_heads=4, n_kv_heads=2, qk_norm=True)
    with torch.device("meta"):
        attn = Attention(D, cfg, MODEL)
    assert attn.rope_cos.is_meta
    attn.to_empty(device="cpu")
    torch.manual_seed(0)
    attn.init_weights(std=0.02, out_std=0.004)
    cos, sin = rope_tables(D // 4, MODEL.max_seq_len, cfg.rope_theta)
    assert torch.equal(attn.rope_cos, cos) and torch.equal(attn.rope_sin, sin)
    assert "rope_cos" not in attn.state_dict()  # non-persistent
    assert torch.equal(attn.q_norm.weight, torch.ones(D // 4))
    assert attn.wo.weight.std().item() == pytest.approx(0.004, rel=0.15)
    assert attn.wq.weight.std().item() == pytest.approx(0.02, rel=0.15)
