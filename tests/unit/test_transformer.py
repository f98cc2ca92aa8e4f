"""The whole model: document isolation, causality, meta-device build, tying, pipeline cuts, gradients.

Shape legend: B batch, S sequence, D dim, V vocabulary.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from sparsetron.model.config import AttentionConfig, ModelConfig, MoEConfig
from sparsetron.model.layers import rope_tables
from sparsetron.model.transformer import Transformer, active_params, num_params, run_pieces

V = 97


def configs(moe: bool = False, tie: bool = False, init_std: float = 0.02, **moe_kw):
    model = ModelConfig(
        vocab_size=V, dim=32, n_layers=3, ffn_hidden=48, tie_embeddings=tie, init_std=init_std, max_seq_len=64
    )
    attn = AttentionConfig(n_heads=4, n_kv_heads=2, qk_norm=True)
    moe_cfg = MoEConfig(**({"num_experts": 4, "top_k": 2, "first_k_dense": 1} | moe_kw)) if moe else MoEConfig()
    model.validate()
    attn.validate(model)
    moe_cfg.validate(model)
    return model, attn, moe_cfg


def build(model_cfg, attn_cfg, moe_cfg, seed=0):
    with torch.device("meta"):
        m = Transformer(model_cfg, attn_cfg, moe_cfg)
    m.to_empty(device="cpu")
    torch.manual_seed(seed)
    m.init_weights()
    return m


# A fine-grained variant with sigmoid scores and gated shared experts, next to the plain one.
FANCY_MOE = dict(granularity=2, score_func="sigmoid", norm_topk_prob=True, n_shared_experts=1, shared_expert_gate=True)
FFN_KINDS = [
    pytest.param(False, {}, id="dense"),
    pytest.param(True, {}, id="moe"),
    pytest.param(True, FANCY_MOE, id="moe-fine-sigmoid-shared"),
]


def scaled_model(moe: bool, tie: bool = False, **moe_kw):
    # A larger init std makes logits O(1), so a leak across documents would show.
    return build(*configs(moe, tie, init_std=0.15, **moe_kw))


def fwd(model, tokens_BS, doc_ids_BS=None):
    """The model's logits for rows holding the documents doc_ids_BS (None: one sequence a row)."""
    return model(tokens_BS, model.sequence_info(tokens_BS, doc_ids_BS))


def rel_close(actual, expected, tol=2e-5):
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * expected.abs().max().item())


@pytest.mark.parametrize("moe, moe_kw", FFN_KINDS)
def test_document_packed_after_another_gives_the_logits_it_gives_alone(moe, moe_kw):
    m = scaled_model(moe, **moe_kw)
    g = torch.Generator().manual_seed(1)
    len_a, len_b, len_c = 13, 17, 7
    doc_a, doc_b, doc_c = (torch.randint(0, V, (1, n), generator=g) for n in (len_a, len_b, len_c))
    packed = torch.cat([doc_a, doc_b, doc_c], dim=1)
    doc_ids = torch.tensor([[0] * len_a + [1] * len_b + [2] * len_c])
    logits = fwd(m, packed, doc_ids)
    rel_close(logits[:, len_a : len_a + len_b], m(doc_b))
    rel_close(logits[:, len_a + len_b :], m(doc_c))
    rel_close(logits[:, :len_a], m(doc_a))
    # Without the document ids, doc B reads doc A and its logits move.
    unmasked = m(packed)
    assert (unmasked[:, len_a : len_a + len_b] - logits[:, len_a : len_a + len_b]).abs().max() > 1e-2


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("packed", [False, True], ids=["one-doc", "packed"])
def test_changing_a_future_token_never_changes_earlier_logits(moe, packed):
    m = scaled_model(moe)
    g = torch.Generator().manual_seed(2)
    S, t = 31, 17
    tokens = torch.randint(0, V, (2, S), generator=g)
    doc_ids = torch.tensor([[0] * 10 + [1] * 21, [4] * 25 + [5] * 6]) if packed else None
    changed = tokens.clone()
    changed[:, t] = (tokens[:, t] + 1 + torch.randint(0, V - 1, (2,), generator=g)) % V
    before, after = fwd(m, tokens, doc_ids), fwd(m, changed, doc_ids)
    rel_close(after[:, :t], before[:, :t], tol=1e-6)
    assert (after[:, t] - before[:, t]).abs().max() > 1e-2


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_meta_build_and_init_is_deterministic_and_matches_a_cpu_build(moe):
    cfgs = configs(moe)
    a, b, c = build(*cfgs, seed=3), build(*cfgs, seed=3), build(*cfgs, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
        assert torch.isfinite(sa[k]).all(), k
    assert not torch.equal(sa["tok_embeddings.weight"], sc["tok_embeddings.weight"])
    # The same init on a model built directly on the CPU gives the same numbers.
    direct = Transformer(*cfgs)
    torch.manual_seed(3)
    direct.init_weights()
    for k, v in direct.state_dict().items():
        assert torch.equal(v, sa[k]), k


def test_init_stds_and_rope_buffers():
    model_cfg = ModelConfig(vocab_size=512, dim=128, n_layers=4, ffn_hidden=256, init_std=0.03, max_seq_len=64)
    attn_cfg = AttentionConfig(n_heads=4, qk_norm=True)
    m = build(model_cfg, attn_cfg, MoEConfig())
    std, out_std = 0.03, 0.03 / math.sqrt(8)
    for name, p in m.named_parameters():
        if name.endswith(("wo.weight", "w2.weight")):
            assert p.std().item() == pytest.approx(out_std, rel=0.1), name
            assert p.mean().abs().item() < out_std / 10, name
        elif "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert p.std().item() == pytest.approx(std, rel=0.1), name
    cos, sin = rope_tables(32, 64, attn_cfg.rope_theta)
    first = m.layers["0"].attention
    for layer in m.layers.values():
        assert torch.equal(layer.attention.rope_cos, cos) and torch.equal(layer.attention.rope_sin, sin)
        assert layer.attention.rope_cos.data_ptr() == first.rope_cos.data_ptr()  # one copy for all layers


def test_tied_embeddings_share_storage_and_gradient():
    m = build(*configs(tie=True))
    assert m.output.weight is m.tok_embeddings.weight
    assert m.output.weight.data_ptr() == m.tok_embeddings.weight.data_ptr()
    untied = build(*configs(tie=False))
    assert num_params(untied) - num_params(m) == V * 32
    tokens = torch.randint(0, V, (2, 9))
    F.cross_entropy(m(tokens).flatten(0, 1), tokens.flatten()).backward()
    # Rows of tokens never seen as input still get gradient, through the head.
    unseen = torch.ones(V, dtype=torch.bool)
    unseen[tokens.flatten()] = False
    assert m.tok_embeddings.weight.grad[unseen].abs().sum(-1).min() > 0


def test_pieces_run_like_pipeline_stages():
    m = scaled_model(False)
    tokens = torch.randint(0, V, (2, 15))
    doc_ids = torch.tensor([[0] * 6 + [1] * 9, [0] * 15])
    seq = m.sequence_info(tokens, doc_ids)
    full = m(tokens, seq)
    blocks = list(m.layers.values())
    hidden = run_pieces(tokens, seq, m.tok_embeddings, blocks[:2], None, None)
    assert hidden.shape == (2, 15, 32)
    assert torch.equal(run_pieces(hidden, seq, None, blocks[2:], m.norm, m.output), full)
    torch.testing.assert_close(run_pieces(hidden, seq, None, [], m.norm, m.output), m.output(m.norm(hidden)))
    # Re-initialising a cut model works too.
    m.norm, m.output = None, None
    del m.layers["2"]
    m.init_weights()


def test_autocast_carries_the_residual_stream_in_its_dtype():
    """As FSDP's bf16 parameters do: the embedding's output, hence every block's input, is bf16."""
    m = scaled_model(False)
    tokens = torch.randint(0, V, (2, 15))
    seq = m.sequence_info(tokens)
    seen = []
    for block in m.layers.values():
        block.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(tokens, seq).dtype == torch.bfloat16
    m(tokens, seq)
    assert seen == [torch.bfloat16] * 3 + [torch.float32] * 3


@pytest.mark.parametrize("moe, moe_kw", FFN_KINDS)
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_every_parameter_gets_a_nonzero_gradient(moe, moe_kw, tie):
    m = build(*configs(moe, tie, **moe_kw))
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, V, (4, 37), generator=g)
    doc_ids = torch.tensor([[0] * 11 + [1] * 19 + [2] * 7] * 4)
    F.cross_entropy(fwd(m, tokens[:, :-1], doc_ids[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_num_and_active_params_agree_for_a_dense_model():
    for tie in (False, True):
        cfgs = configs(tie=tie)
        m = build(*cfgs)
        assert num_params(m, exclude_embeddings=True) == active_params(*cfgs)
        assert num_params(m) == active_params(*cfgs) + (0 if tie else V * 32)


@pytest.mark.parametrize(
    "moe_kw",
    [
        {},
        {"n_shared_experts": 1, "shared_expert_gate": True},
        {"granularity": 2, "n_shared_experts": 2, "first_k_dense": 0},
    ],
    ids=["plain", "shared-gated", "fine-grained"],
)
def test_active_params_counts_top_k_experts(moe_kw):
    # With every expert chosen, a token touches every parameter of the model.
    all_active = configs(True, **(moe_kw | {"top_k": 4}))
    m = build(*all_active)
    assert active_params(*all_active) == num_params(m, exclude_embeddings=True)
    # Each expert left unchosen removes one expert's SwiGLU from every MoE layer.
    half = configs(True, **(moe_kw | {"top_k": 2}))
    moe_cfg = half[2]
    moe_layers = 3 - moe_cfg.first_k_dense
    expert = 3 * 32 * moe_cfg.hidden_size(half[0])
    dropped = moe_layers * 2 * moe_cfg.granularity * expert
    assert active_params(*half) == num_params(build(*half), exclude_embeddings=True) - dropped


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_bf16_autocast_stays_close_to_fp32(moe):
    m = scaled_model(moe)
    tokens = torch.randint(0, V, (2, 23))
    doc_ids = torch.tensor([[0] * 9 + [1] * 14] * 2)
    ref = fwd(m, tokens, doc_ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = fwd(m, tokens, doc_ids)
    assert low.dtype == torch.bfloat16
    # bf16 keeps 8 bits (2^-9 relative rounding); a few roundings through three layers stay within
    # a few percent of each token's logit scale (measured ~1%). A MoE token whose rounded router
    # input flips an expert choice moves further (measured 10% at worst): there the typical token counts.
    token_err = (low.float() - ref).abs().amax(-1) / ref.abs().amax(-1)
    assert (token_err.median() if moe else token_err.max()) < 0.03, token_err


def test_bad_inputs_raise_clear_errors():
    model_cfg, attn_cfg, moe_cfg = configs()
    m = build(model_cfg, attn_cfg, moe_cfg)
    with pytest.raises(ValueError, match="max_seq_len=64"):
        m(torch.zeros(1, 65, dtype=torch.long))
    tokens = torch.zeros(2, 9, dtype=torch.long)
    with pytest.raises(ValueError, match=r"describes \[B, S\] = \[2, 8\], the tokens are \[2, 9\]"):
        m(tokens, m.sequence_info(tokens[:, :8]))
    model_cfg.vocab_size = 0
    with pytest.raises(ValueError, match="vocab_size"):
        Transformer(model_cfg, attn_cfg, moe_cfg)
