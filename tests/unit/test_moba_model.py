"""MoBA in the model: config keys, exactness where MoBA is full attention, packing, hybrid
layers, the switch to full attention and the trainer that sets it, gradients, compile.

Shape legend: B batch, S sequence, D dim, V vocabulary, T packed tokens, H heads, K kv heads, d head dim.
"""

import re
from dataclasses import replace

import pytest
import torch

from sparsetron.kernels.moba import moba_reference
from sparsetron.model.attention import Attention, set_full_attention
from sparsetron.model.config import AttentionConfig, ConfigError, ModelConfig
from sparsetron.model.layers import apply_rope
from sparsetron.model.sequence import SequenceInfo, positions_from_doc_ids
from sparsetron.model.transformer import Transformer
from sparsetron.train.config_io import load_job_config
from sparsetron.train.trainer import Trainer

V, S = 97, 61  # S not a multiple of the block size: the last block is partial
MODEL = ModelConfig(vocab_size=V, dim=32, n_layers=3, ffn_hidden=48, max_seq_len=64, init_std=0.15)
SDPA = AttentionConfig(n_heads=4, n_kv_heads=2, qk_norm=True)
TOL = 1e-5


def moba(block_size=8, topk=2, **kw):
    cfg = replace(SDPA, backend="moba", moba_block_size=block_size, moba_topk=topk, **kw)
    cfg.validate(MODEL)
    return cfg


def build(attn_cfg, model_cfg=MODEL, seed=0):
    """A model with the weights `seed` gives any attention config of the same shape."""
    torch.manual_seed(seed)
    model = Transformer(model_cfg, attn_cfg)
    model.init_weights()
    return model


def inputs(B=2, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    tokens_BS = torch.randint(0, V, (B, S), generator=g)
    # Documents of random lengths, several per row; ids increase along a row.
    doc_ids_BS = (torch.rand(B, S, generator=g) < 0.05).long().cumsum(dim=1)
    doc_ids_BS[:, 40] += 1  # at least two documents in every row
    doc_ids_BS[:, 41:] += 1
    return tokens_BS, doc_ids_BS


def fwd(model, tokens_BS, doc_ids_BS=None):
    """The model's logits for rows holding the documents doc_ids_BS (None: one sequence a row)."""
    return model(tokens_BS, model.sequence_info(tokens_BS, doc_ids_BS))


def assert_close(actual, expected, tol=TOL):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=0, atol=tol * max(scale, 1.0))


def differ(a, b):
    return (a - b).abs().max().item() > 1e-2


# ---- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["attention.backend=flash"], r"attention\.backend: 'flash' is not one of sdpa, moba"),
        (["attention.moba_block=64"], r"unknown key attention\.moba_block\b"),
        (["attention.moba_topk=three"], r"attention\.moba_topk: expected an integer, got 'three'"),
        (["attention.moba_full_layers=3"], r"attention\.moba_full_layers: expected a list"),
        (["attention.moba_full_after=soon"], r"attention\.moba_full_after: expected a number"),
        (["attention.moba_block_size=0"], r"attention\.moba_block_size: must be >= 1, got 0"),
        (["attention.moba_topk=0"], r"attention\.moba_topk: must be >= 1"),
        (
            ["attention.moba_full_last=0", "attention.moba_full_layers=[0, 4, -1]"],
            r"attention\.moba_full_layers: layer indices must be in \[0, model\.n_layers=4\), got \[4, -1\]",
        ),
        (
            ["attention.moba_full_last=0", "attention.moba_full_layers=[1, 1]"],
            r"attention\.moba_full_layers: lists layers \[1\] more than once",
        ),
        (["attention.moba_full_last=5"], r"attention\.moba_full_last: must be in \[0, model\.n_layers=4\], got 5"),
        (["attention.moba_full_layers=[0]"], r"attention\.moba_full_last: give either moba_full_layers"),
        (["attention.moba_full_after=1.5"], r"attention\.moba_full_after: must be in \[0, 1\]"),
        (["attention.moba_full_after=-0.1"], r"attention\.moba_full_after: must be in \[0, 1\]"),
        # Checked under sdpa too: flipping the backend never turns a bad value into a valid config.
        (["attention.backend=sdpa", "attention.moba_full_last=9"], r"attention\.moba_full_last"),
    ],
)
def test_bad_moba_settings_name_the_key(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_job_config("tiny-moba", overrides)


def test_tiny_moba_is_tiny_at_four_times_the_length_with_moba():
    tiny, tm = load_job_config("tiny"), load_job_config("tiny-moba")
    assert tm.model == tiny.model and tm.moe == tiny.moe and tm.optimizer == tiny.optimizer
    assert tm.data.seq_len == 4 * tiny.data.seq_len
    # The same tokens per step.
    assert tm.data.seq_len * tm.trainer.micro_batch_size == tiny.data.seq_len * tiny.trainer.micro_batch_size
    assert replace(tm.attention, backend="sdpa") == replace(
        tiny.attention, moba_block_size=128, moba_topk=3, moba_full_last=1
    )
    assert tm.attention.backend == "moba"
    # The comparison run is the recipe with one override.
    assert load_job_config("tiny-moba", ["attention.backend=sdpa"]).attention.backend == "sdpa"


def test_which_layers_run_moba_and_when():
    assert moba(moba_full_last=2).full_attention_layers(5) == [3, 4]
    assert moba(moba_full_layers=[2, 0]).full_attention_layers(5) == [0, 2]
    assert moba().full_attention_layers(5) == []
    assert SDPA.full_attention_layers(3) == [0, 1, 2]
    model = build(moba(moba_full_last=1))
    assert [layer.attention.moba for layer in model.layers.values()] == [True, True, False]
    model = build(moba(moba_full_layers=[1]))
    assert [layer.attention.moba for layer in model.layers.values()] == [True, False, True]
    # The switch: the fewest steps covering the fraction run MoBA; 1.0 = never; sdpa = never.
    assert moba(moba_full_after=0.7).moba_switch_step(10) == 7
    assert moba(moba_full_after=0.9).moba_switch_step(300) == 270
    assert moba(moba_full_after=0.5).moba_switch_step(3) == 2
    assert moba(moba_full_after=0.0).moba_switch_step(3) == 0
    assert moba(moba_full_after=1.0).moba_switch_step(3) is None
    assert moba(moba_full_after=0.99).moba_switch_step(10) is None  # 9.9 rounds up to all 10 steps
    assert replace(SDPA, moba_full_after=0.5).moba_switch_step(10) is None


# ---- the model ------------------------------------------------------------------------------


@pytest.mark.parametrize("docs", [False, True], ids=["rows", "documents"])
def test_moba_covering_the_sequence_is_full_attention(docs):
    # The spec: L <= K * B is exactly full causal attention. 8 blocks of 8 >= 61 tokens.
    tokens, doc_ids = inputs()
    doc_ids = doc_ids if docs else None
    full = fwd(build(SDPA), tokens, doc_ids)
    assert_close(fwd(build(moba(block_size=8, topk=8)), tokens, doc_ids), full)
    assert_close(fwd(build(moba(block_size=64, topk=1)), tokens, doc_ids), full)
    assert differ(fwd(build(moba(block_size=8, topk=2)), tokens, doc_ids), full)


def test_moba_layer_is_the_reference_on_its_projections():
    """One layer by hand: project, rotate, MoBA per document of the packed batch, project back."""
    cfg = moba(block_size=4, topk=3)
    attn = Attention(MODEL.dim, cfg, MODEL)
    torch.manual_seed(1)
    attn.init_weights(std=MODEL.dim**-0.5, out_std=MODEL.dim**-0.5)
    B, H, K, d = 2, attn.n_heads, attn.n_kv_heads, attn.head_dim
    x = torch.randn(B, S, MODEL.dim)
    _, doc_ids = inputs(B)
    positions = positions_from_doc_ids(doc_ids)
    q = apply_rope(attn.q_norm(attn.wq(x).view(B, S, H, d)), attn.rope_cos, attn.rope_sin, positions)
    k = apply_rope(attn.k_norm(attn.wk(x).view(B, S, K, d)), attn.rope_cos, attn.rope_sin, positions)
    v = attn.wv(x).view(B, S, K, d)
    # The documents' bounds in the packed batch, written out here.
    starts = [b * S + s for b in range(B) for s in range(S) if s == 0 or doc_ids[b, s] != doc_ids[b, s - 1]]
    cu = torch.tensor([*starts, B * S], dtype=torch.int32)
    o = moba_reference(q.reshape(B * S, H, d), k.reshape(B * S, K, d), v.reshape(B * S, K, d), cu, 4, 3)
    expected = attn.wo(o.reshape(B, S, H * d))
    assert_close(attn(x, SequenceInfo.build(B, S, doc_ids)), expected)
    # Without documents each row is one sequence.
    rows = torch.arange(S).expand(B, S)
    q = apply_rope(attn.q_norm(attn.wq(x).view(B, S, H, d)), attn.rope_cos, attn.rope_sin, rows)
    k = apply_rope(attn.k_norm(attn.wk(x).view(B, S, K, d)), attn.rope_cos, attn.rope_sin, rows)
    cu_rows = torch.tensor([0, S, 2 * S], dtype=torch.int32)
    o = moba_reference(q.reshape(B * S, H, d), k.reshape(B * S, K, d), v.reshape(B * S, K, d), cu_rows, 4, 3)
    assert_close(attn(x, SequenceInfo.build(B, S)), attn.wo(o.reshape(B, S, H * d)))


def test_packed_documents_give_the_logits_they_give_alone():
    model = build(moba(block_size=4, topk=2))
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    first, second = 37, S - 37  # both longer than topk x block, so MoBA is sparse in each
    tokens = torch.randint(0, V, (1, S), generator=g)
    doc_ids = torch.tensor([[0] * first + [1] * second])
    packed = fwd(model, tokens, doc_ids)
    assert_close(packed[:, :first], fwd(model, tokens[:, :first]))
    assert_close(packed[:, first:], fwd(model, tokens[:, first:]))
    # Without document masking the second document sees the first: not what it gives alone.
    unmasked = build(replace(moba(block_size=4, topk=2), document_masking=False))
    assert differ(fwd(unmasked, tokens, doc_ids)[:, first:], fwd(model, tokens[:, first:]))


def test_hybrid_full_layers_run_sdpa():
    tokens, doc_ids = inputs()
    full = fwd(build(SDPA), tokens, doc_ids)
    # Every layer listed full, by index or as the last N: the sdpa model, blocks notwithstanding.
    assert_close(fwd(build(moba(block_size=4, topk=1, moba_full_layers=[2, 0, 1])), tokens, doc_ids), full)
    assert_close(fwd(build(moba(block_size=4, topk=1, moba_full_last=3)), tokens, doc_ids), full)
    # Layer by layer: the listed layer computes what SDPA does, the others do not.
    hybrid, reference = build(moba(block_size=4, topk=1, moba_full_last=1)), build(SDPA)
    x = torch.randn(2, S, MODEL.dim)
    seq = SequenceInfo.build(2, S, doc_ids)
    for key in ("0", "1", "2"):
        out = hybrid.layers[key].attention(x, seq)
        expected = reference.layers[key].attention(x, seq)
        if key == "2":
            assert_close(out, expected)
        else:
            assert differ(out, expected)


def test_switch_to_full_attention():
    tokens, doc_ids = inputs()
    full = fwd(build(SDPA), tokens, doc_ids)
    model = build(moba(block_size=4, topk=2, moba_full_last=1))
    sparse = fwd(model, tokens, doc_ids)
    assert differ(sparse, full)
    assert set_full_attention(model, True) == 2  # the MoBA layers; the full last one is left alone
    assert_close(fwd(model, tokens, doc_ids), full)
    assert set_full_attention(model, False) == 2
    assert torch.equal(fwd(model, tokens, doc_ids), sparse)
    assert set_full_attention(build(SDPA), True) == 0


@pytest.mark.parametrize("docs", [False, True], ids=["rows", "documents"])
def test_gradients_reach_the_projections(docs):
    tokens, doc_ids = inputs()
    doc_ids = doc_ids if docs else None
    model = build(moba(block_size=4, topk=2))
    fwd(model, tokens, doc_ids).square().mean().backward()
    for layer in model.layers.values():
        for name in ("wq", "wk", "wv", "wo"):
            grad = getattr(layer.attention, name).weight.grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0, name
    # Where MoBA is full attention, so are its gradients.
    covering, full = build(moba(block_size=8, topk=8)), build(SDPA)
    for m in (covering, full):
        fwd(m, tokens, doc_ids).square().mean().backward()
    for p, q in zip(covering.parameters(), full.parameters(), strict=True):
        assert_close(p.grad, q.grad, tol=1e-4)


def test_compiled_blocks_match_eager_across_documents_and_the_switch():
    model_cfg = replace(MODEL, n_layers=1)
    cfg = moba(block_size=4, topk=2)
    eager, compiled = build(cfg, model_cfg), build(cfg, model_cfg)
    # As parallel/compile.py does, with AOTAutograd's eager backend: what MoBA needs of compile
    # (a graph break at the op, guards on the switch and on cu_seqlens' length) is dynamo's, and
    # inductor's C++ build would take most of this file's time on 2 cores.
    for block in compiled.layers.values():
        block.compile(backend="aot_eager")
    tokens, doc_ids = inputs()
    _, other_docs = inputs()
    # Another document count (cu_seqlens of another length), then the switch and back.
    for docs, full in [(doc_ids, False), (other_docs, False), (doc_ids, True), (other_docs, False)]:
        for m in (eager, compiled):
            set_full_attention(m, full)
            m.zero_grad()
        expected, out = fwd(eager, tokens, docs), fwd(compiled, tokens, docs)
        assert_close(out, expected)
        expected.square().mean().backward()
        out.square().mean().backward()
        wq, ref_wq = compiled.layers["0"].attention.wq.weight.grad, eager.layers["0"].attention.wq.weight.grad
        assert_close(wq, ref_wq, tol=1e-4)


# ---- the trainer ----------------------------------------------------------------------------

TRAIN = [
    "data.max_documents=200",
    "data.seq_len=64",
    "attention.moba_block_size=8",
    "attention.moba_topk=2",
    "attention.moba_full_after=0.5",
    "trainer.micro_batch_size=2",
    "trainer.eval_batches=1",
    "trainer.eval_interval=2",
    "schedule.warmup_steps=1",
    "checkpoint.interval=2",
    "checkpoint.keep_last=0",
    "metrics.console=plain",
    "metrics.tensorboard=false",
]


def moba_job(run_dir, *overrides, steps=4):
    return load_job_config("tiny-moba", [*TRAIN, f"trainer.steps={steps}", f"trainer.run_dir={run_dir}", *overrides])


def modes(trainer):
    return [m.full_attention for m in trainer.model.modules() if isinstance(m, Attention) and m.moba]


def test_trainer_switches_from_the_step_and_resumes_identically(tmp_path, capsys):
    straight = Trainer(moba_job(tmp_path / "straight")).run()
    out = capsys.readouterr().out
    assert len(re.findall(r"switch to full attention", out)) == 1
    assert "step 3: MoBA layers switch to full attention for the last 2 steps" in out

    trainer = Trainer(moba_job(tmp_path / "steps"))
    seen = []
    for _ in range(4):
        trainer.train_step()
        seen.append(modes(trainer))
    assert seen == [[False] * 3, [False] * 3, [True] * 3, [True] * 3]
    trainer.step = 2  # evaluation attends as the last step trained (step index 1: MoBA)
    trainer.evaluate()
    assert modes(trainer) == [False] * 3
    trainer.close()

    first = Trainer(moba_job(tmp_path / "split", "trainer.stop_at=3")).run()
    resumed = Trainer(moba_job(tmp_path / "split"), resume="auto").run()
    assert "MoBA layers run full attention since step 3" in capsys.readouterr().out
    assert {**first.losses, **resumed.losses} == straight.losses
    assert resumed.eval_losses[4] == straight.eval_losses[4]
