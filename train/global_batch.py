"""The global batch: sequences per optimizer step over every data-parallel rank, and the gradient
accumulation a layout needs to train it.

    global_batch_size = micro_batch_size x grad_accum_steps x data-parallel degree

`trainer.global_batch_size` 0 keeps the accumulation as configured, so the batch follows the
layout; set, it fixes the batch and the accumulation follows the layout. The data-parallel degree
is known once the layout is resolved (`ParallelDims.from_config`): the Trainer resolves the batch
right after, before anything is built, and everything downstream (the step runner, the memory
plan, tokens per step, the saved config) reads the resolved trainer section.
"""

from __future__ import annotations

from sparsetron.model.config import ConfigError
from sparsetron.train.config import TrainerConfig

__all__ = ["accumulation_key", "describe_global_batch", "resolve_global_batch"]


def resolve_global_batch(tc: TrainerConfig, dp: int) -> None:
    """Fill in `tc.global_batch_size` and `tc.grad_accum_steps` for `dp` data-parallel ranks, in place.

    Raises ConfigError when trainer.global_batch_size does not split into micro-batches of
    micro_batch_size on dp ranks (naming the values that would), or when grad_accum_steps is set
    to something other than what the global batch implies.
    """
    B, G = tc.micro_batch_size, tc.global_batch_size
    if G == 0:
        tc.global_batch_size = B * tc.grad_accum_steps * dp
        return
    per_micro_batch = B * dp
    if G % per_micro_batch:
        raise ConfigError(
            f"trainer.global_batch_size: {G} sequences do not split into micro-batches of "
            f"trainer.micro_batch_size={B} on data-parallel degree {dp} (it must be a multiple of "
            f"{B} x {dp} = {per_micro_batch}); nearest that work: {_nearest(G, B, dp)}"
        )
    accum = G // per_micro_batch
    if tc.grad_accum_steps not in (1, accum):
        raise ConfigError(
            f"trainer.grad_accum_steps: {tc.grad_accum_steps} contradicts trainer.global_batch_size={G}, which "
            f"takes {accum} = {G} / (micro_batch_size {B} x data-parallel degree {dp}) on this layout; "
            "leave grad_accum_steps at 1 to have it derived, or set global_batch_size to 0"
        )
    tc.grad_accum_steps = accum


def describe_global_batch(tc: TrainerConfig, dp: int) -> str:
    """The resolved batch in one line, e.g. '16 sequences per step = micro_batch_size 4 x
    grad_accum_steps 2 x data-parallel 2'."""
    return (
        f"{tc.global_batch_size} sequences per step = micro_batch_size {tc.micro_batch_size} x "
        f"grad_accum_steps {tc.grad_accum_steps} x data-parallel {dp}"
    )


def accumulation_key(tc: TrainerConfig, dp: int, from_global_batch: bool) -> str:
    """How an error about the number of micro-batches per step names it: the key, and where it came
    from when trainer.global_batch_size was set."""
    if not from_global_batch:
        return "trainer.grad_accum_steps"
    return (
        f"trainer.grad_accum_steps (= trainer.global_batch_size {tc.global_batch_size} / "
        f"(micro_batch_size {tc.micro_batch_size} x data-parallel degree {dp}))"
    )


def _nearest(G: int, B: int, dp: int) -> str:
    """The global batch sizes next to G that split on this layout, and the micro-batch sizes next to B
    that split G."""
    unit = B * dp
    below, above = G // unit * unit, -(-G // unit) * unit
    sizes = " or ".join(str(g) for g in (below, above) if g > 0)
    text = f"trainer.global_batch_size={sizes}"
    if G % dp:
        return f"{text} (no trainer.micro_batch_size splits {G}: it is not a multiple of the data-parallel degree {dp})"
    per_rank = G // dp
    divisors = [d for d in range(1, per_rank + 1) if per_rank % d == 0]
    smaller = [d for d in divisors if d < B]
    larger = [d for d in divisors if d > B]
    micro = " or ".join(str(d) for d in (smaller[-1:] + larger[:1]))
    return f"{text}, or trainer.micro_batch_size={micro}"
