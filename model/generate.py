"""Autoregressive sampling from a Transformer: the model's next-token distribution, one token at a time.

    ids_S = generate(model, prompt_ids, max_new_tokens=100, temperature=0.8, top_k=40, seed=0)

No KV cache: every step runs the whole forward over the sequence so far, cut to its last
model.max_seq_len tokens. That costs O(S) forwards of up to S tokens, fine for looking at what a
small model learned, and it is right for every attention (MoBA included, whose blocks a cache
would have to track) and every MoE layer. Temperature 0 is greedy decoding (the argmax, ties to
the lower id); above 0 the logits are divided by it and, with top_k > 0, all but the k largest
are dropped before sampling with a generator seeded by `seed`, so a seed reproduces its sample.

Shape legend: S tokens, V vocabulary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from sparsetron.model.transformer import Transformer

__all__ = ["generate", "next_token"]


def next_token(logits_V: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> int:
    """One token id from the logits of the last position: greedy at temperature 0, else sampled."""
    if temperature == 0:
        return int(logits_V.argmax())
    logits_V = logits_V.float() / temperature
    if 0 < top_k < logits_V.numel():
        kth = torch.topk(logits_V, top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    probs_V = torch.softmax(logits_V, dim=-1)
    return int(torch.multinomial(probs_V, 1, generator=generator))


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    stop_id: int | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
    vocab_size: int | None = None,
) -> list[int]:
    """The prompt followed by up to `max_new_tokens` generated ids (fewer when `stop_id` is
    generated; it is kept). `autocast` is the precision policy's context for the forward (None:
    the model's own dtype). Only ids below `vocab_size` (the tokenizer's; the model's table is
    rounded up past it, and those rows are never trained) are generated; None: any row of the
    model's output. The model is put in eval mode for the call and restored."""
    if not prompt_ids:
        raise ValueError("generate needs a prompt of at least one token")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    ids = list(prompt_ids)
    window = model.model_cfg.max_seq_len
    was_training = model.training
    model.eval()
    try:
        with autocast if autocast is not None else contextlib.nullcontext():
            for _ in range(max_new_tokens):
                tokens_1S = torch.tensor([ids[-window:]], dtype=torch.long, device=device)
                logits_V = model(tokens_1S)[0, -1, :vocab_size]
                ids.append(next_token(logits_V.float(), temperature, top_k, generator))
                if ids[-1] == stop_id:
                    break
    finally:
        model.train(was_training)
    return ids
