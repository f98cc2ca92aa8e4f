"""Sampling (model/generate.py): greedy decoding equals a manual argmax loop over the model's logits
for dense, MoE and MoBA models (the window cut to max_seq_len included); a seed reproduces its
sample; the sampled distribution is the tempered, top-k-cut softmax. The command on a trained
checkpoint is tested in test_eval.py, on the run it already trains."""

import random

import pytest
import torch

from sparsetron.model.config import AttentionConfig, ModelConfig, MoEConfig
from sparsetron.model.generate import generate, next_token
from sparsetron.model.transformer import Transformer, materialised_transformer

VOCAB, WINDOW = 80, 24

MODELS = {
    "dense": (AttentionConfig(n_heads=4, n_kv_heads=2), None),
    "moe": (
        AttentionConfig(n_heads=4, n_kv_heads=2),
        MoEConfig(num_experts=4, granularity=2, top_k=1, n_shared_experts=1, route_order="topk_then_softmax"),
    ),
    "moba": (AttentionConfig(n_heads=4, n_kv_heads=2, backend="moba", moba_block_size=4, moba_topk=2), None),
}


def build(kind: str, seed: int) -> Transformer:
    """A 2-layer model of the kind with its output head scaled up so that the logits differ by more
    than their rounding (a fresh init's are all near 0)."""
    attn_cfg, moe_cfg = MODELS[kind]
    model_cfg = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, ffn_hidden=64, max_seq_len=WINDOW)
    torch.manual_seed(seed)
    model = materialised_transformer(model_cfg, attn_cfg, moe_cfg)
    with torch.no_grad():
        model.output.weight.mul_(50)
    return model


@pytest.mark.parametrize("kind", list(MODELS))
def test_greedy_is_the_argmax_loop_and_deterministic(kind):
    seed = random.randrange(1 << 30)
    model = build(kind, seed)
    prompt = torch.randint(0, VOCAB, (9,), generator=torch.Generator().manual_seed(seed)).tolist()
    new = 22  # the sequence outgrows the window of 24: the forward sees its last 24 tokens
    got = generate(model, prompt, new, temperature=0.0)

    ids = list(prompt)
    model.eval()
    with torch.no_grad():
        for _ in range(new):
            logits_SV = model(torch.tensor([ids[-WINDOW:]]))[0]
            ids.append(int(logits_SV[-1].argmax()))
    model.train()
    assert got == ids, seed
    assert generate(model, prompt, new, temperature=0.0) == got
    # A stop id ends generation once generated, and is kept.
    stop = got[len(prompt) + 3]
    stopped = generate(model, prompt, new, temperature=0.0, stop_id=stop)
    assert stopped == got[: got.index(stop, len(prompt)) + 1]
    assert model.training  # restored


def test_sampling_is_reproducible_by_seed():
    seed = random.randrange(1 << 30)
    model = build("moe", seed)
    prompt = [5, 17, 3]
    first = generate(model, prompt, 20, temperature=1.0, seed=seed)
    assert generate(model, prompt, 20, temperature=1.0, seed=seed) == first
    # Another seed, another sample: at a temperature that flattens the distribution, 40 tokens drawn alike are out of reach.
    assert generate(model, prompt, 40, temperature=5.0, seed=seed) != generate(
        model, prompt, 40, temperature=5.0, seed=seed + 1
    )
    # Ids past the tokenizer's vocabulary (the model's table is larger) are never drawn.
    hot = generate(model, prompt, 60, temperature=50.0, seed=seed, vocab_size=VOCAB - 30)
    assert max(hot[len(prompt) :]) < VOCAB - 30 and max(generate(model, prompt, 60, temperature=50.0)) >= VOCAB - 30
    # top_k=1 is greedy whatever the temperature and seed.
    assert generate(model, prompt, 20, temperature=3.0, top_k=1, seed=seed) == generate(model, prompt, 20)


def test_next_token_draws_from_the_tempered_top_k_softmax():
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    logits_V = torch.randn(6, generator=gen) * 2
    draws = 10000
    for temperature, top_k in ((0.7, 0), (1.5, 3)):
        counts = torch.zeros(6)
        for _ in range(draws):
            counts[next_token(logits_V, temperature, top_k, gen)] += 1
        expected = logits_V / temperature
        if top_k:
            expected = expected.masked_fill(expected < expected.topk(top_k).values[-1], float("-inf"))
        p = torch.softmax(expected, dim=-1)
        # 5 standard deviations of a binomial count, and nothing outside the top k.
        assert ((counts / draws - p).abs() <= 5 * (p * (1 - p) / draws).sqrt() + 1e-9).all(), (counts / draws, p)
    assert next_token(logits_V, 0.0, 0, None) == int(logits_V.argmax())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt_ids": []}, "a prompt of at least one token"),
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"top_k": -1}, "top_k must be >= 0"),
    ],
)
def test_bad_arguments(kwargs, message):
    model = build("dense", 0)
    args = {"prompt_ids": [1, 2], "max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(model, **args)
