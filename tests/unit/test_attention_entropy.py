"""Sampled attention entropy (model/attention_entropy.py, metrics.attention_entropy_interval): the
sampled rows' entropies equal those of the full attention matrix computed directly in fp64 (full
causal attention, packed documents, MoBA's selected blocks), the model's layers record it at a
probed step only, and context parallelism is refused by name."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sparsetron.model.attention_entropy import (
    attention_entropy,
    sample_positions,
    sampled_entropy,
    set_entropy_probes,
)
from sparsetron.model.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig
from sparsetron.model.sequence import SequenceInfo
from sparsetron.model.transformer import materialised_transformer
from sparsetron.train.config_io import load_job_config
from sparsetron.train.trainer import Trainer

B, S, H, K, d = 2, 45, 4, 2, 8
BLOCK, TOPK = 6, 3


def moba_allowed(q_Hd: torch.Tensor, k_LKd: torch.Tensor, t: int) -> torch.Tensor:
    """MoBA's keys for the query at position t of a document, written out from the spec: its own
    block and the TOPK - 1 fully past blocks with the largest q . mean(k), causal: bool [H, L]."""
    L = k_LKd.shape[0]
    allowed = torch.zeros(H, L, dtype=torch.bool)
    current = t // BLOCK
    for h in range(H):
        k_Ld = k_LKd[:, h // (H // K)].double()
        gates = [q_Hd[h].double() @ k_Ld[j * BLOCK : (j + 1) * BLOCK].mean(0) for j in range(current)]
        best = sorted(range(current), key=lambda j: -gates[j])[: TOPK - 1]
        for j in [*best, current]:
            allowed[h, j * BLOCK : (j + 1) * BLOCK] = True
    allowed[:, t + 1 :] = False
    return allowed


def direct_entropies(q, k, doc_ids_BS, moba: bool) -> torch.Tensor:
    """Every row's entropy of the full attention matrix, fp64: [B, H, S]."""
    out = torch.zeros(B, H, S, dtype=torch.float64)
    for b in range(B):
        docs = doc_ids_BS[b] if doc_ids_BS is not None else torch.zeros(S, dtype=torch.long)
        for t in range(S):
            keys = [u for u in range(t + 1) if docs[u] == docs[t]]
            start = keys[0]
            allowed_HU = torch.ones(H, len(keys), dtype=torch.bool)
            if moba:
                allowed_HU = moba_allowed(q[b, t], k[b, start : keys[-1] + 1], t - start)
            for h in range(H):
                scores = q[b, t, h].double() @ k[b, start : t + 1, h // (H // K)].double().T / math.sqrt(d)
                p = torch.softmax(scores.masked_fill(~allowed_HU[h], float("-inf")), dim=0)
                out[b, h, t] = -(p[p > 0] * p[p > 0].log()).sum()
    return out


@pytest.mark.parametrize("documents", [False, True], ids=["rows", "documents"])
@pytest.mark.parametrize("moba", [False, True], ids=["full", "moba"])
def test_sampled_entropy_equals_the_full_attention_matrix_rows(documents, moba):
    torch.manual_seed(7 + 2 * documents + moba)
    # Scaled up so that attention is peaked somewhere and flat elsewhere, and MoBA's choice matters.
    q, k = 3 * torch.randn(B, S, H, d), 3 * torch.randn(B, S, K, d)
    doc_ids = torch.tensor([[0] * 20 + [1] * 25, [0] * 7 + [1] * 30 + [2] * 8]) if documents else None
    seq = SequenceInfo.build(B, S, doc_ids)
    sampled_BHQ = sampled_entropy(q, k, seq, (BLOCK, TOPK) if moba else None)
    expected_BHQ = direct_entropies(q, k, doc_ids, moba)[:, :, sample_positions(S)]
    assert sampled_BHQ.dtype == torch.float32 and sampled_BHQ.shape == (B, H, 16)
    # fp32 softmax over at most S keys: a few eps per term of the sum, relative to log S.
    torch.testing.assert_close(sampled_BHQ.double(), expected_BHQ, rtol=0, atol=S * 4 * torch.finfo().eps * math.log(S))
    assert expected_BHQ.std() > 0.1  # the rows differ: a wrong mask or sample would show


def test_sample_positions_are_fixed_spread_and_in_range():
    assert sample_positions(256).tolist() == [8 + 16 * i for i in range(16)]
    assert sample_positions(5).tolist() == [0, 1, 2, 3, 4]


def test_the_model_records_entropy_at_probed_steps_only():
    model_cfg = ModelConfig(vocab_size=61, dim=32, n_layers=2, ffn_hidden=48, max_seq_len=64)
    attn = AttentionConfig(n_heads=4, n_kv_heads=2, backend="moba", moba_block_size=8, moba_topk=2, moba_full_last=1)
    model_cfg.validate()
    attn.validate(model_cfg)
    torch.manual_seed(0)
    model = materialised_transformer(model_cfg, attn, MoEConfig())
    tokens = torch.randint(0, 61, (2, 40))
    model(tokens)
    assert attention_entropy(model) == {}
    set_entropy_probes(model, True)
    model(tokens)
    once = attention_entropy(model)
    model(tokens)  # a second micro-batch (the same one, as an activation checkpoint's rerun): the same mean
    assert attention_entropy(model) == pytest.approx(once, rel=1e-12)
    assert sorted(once) == ["attention/layer0/entropy", "attention/layer1/entropy"]
    assert all(0 < value <= math.log(40) for value in once.values())
    set_entropy_probes(model, False)
    assert attention_entropy(model) == {}


SMALL = [
    "data.max_documents=100",
    "data.seq_len=32",
    "model.n_layers=2",
    "trainer.micro_batch_size=2",
    "trainer.eval_batches=1",
    "trainer.eval_interval=0",
    "checkpoint.interval=0",
    "checkpoint.save_final=false",
    "metrics.log_interval=3",
    "metrics.console=none",
]


def test_the_trainer_logs_each_layers_entropy_at_its_interval(tmp_path):
    job = load_job_config(
        "tiny", [*SMALL, "trainer.steps=3", f"trainer.run_dir={tmp_path}", "metrics.attention_entropy_interval=2"]
    )
    Trainer(job).run()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    probed = {line["step"]: line for line in lines if "attention/layer0/entropy" in line}
    assert list(probed) == [2]
    assert 0 < probed[2]["attention/layer1/entropy"] <= math.log(32)


def test_context_parallelism_is_refused_by_name():
    with pytest.raises(ConfigError, match="metrics.attention_entropy_interval"):
        load_job_config("tiny", ["metrics.attention_entropy_interval=5", "parallel.context=2"])
    with pytest.raises(ConfigError, match="metrics.attention_entropy_interval"):
        load_job_config("tiny", ["metrics.attention_entropy_interval=-1"])
