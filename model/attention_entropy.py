"""Attention entropy per layer, sampled (metrics.attention_entropy_interval): the signal of the
entropy-collapse paper (Zhai et al. 2023), whose collapse precedes loss spikes.

At a probed step every attention layer holds an `EntropyProbe`; its forward hands the probe the
q and k it computed (after norms and rotary), and the probe adds the entropy (nats) of the
attention rows of QUERIES_PER_ROW query positions per row, evenly spaced and fixed, for every
query head the layer holds, under the exact mask the layer applies: causal, within each
document when rows hold packed documents, and for a MoBA layer only the keys of the blocks its
gate selects (`kernels.moba.reference.moba_selection`, the oracle of MoBA's kernels). That costs
QUERIES_PER_ROW / S of the layer's attention scores. Every head rather than a few: the cost is
already small, and a fixed subset of a rank's heads would be another subset at another tensor-
parallel degree, so layouts would log different numbers. The probe's sums and counts cover every
micro-batch of the step (an activation checkpoint's recomputation adds each again, which
leaves the mean unchanged).

`attention_entropy` then gives each layer's mean over what every rank sampled: tensor-parallel
ranks hold other heads, data ranks other rows, so sums and counts are added over them by the
caller's reducer before dividing. Context parallelism is refused with the metric (config
validation): a rank's queries would need the whole keys to compute rows exactly.

Shape legend: B rows, S positions, H query heads, K key/value heads, d head dim, Q sampled
queries per row, L tokens of one document, n its MoBA blocks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparsetron.kernels.moba.reference import moba_selection
from sparsetron.model.attention import Attention
from sparsetron.model.sequence import SequenceInfo
from sparsetron.model.transformer import Block

QUERIES_PER_ROW = 16
"""Query positions sampled per row (fewer when the row is shorter)."""


def sample_positions(S: int, device=None) -> torch.Tensor:
    """QUERIES_PER_ROW positions evenly spread over a row of S, the middle of each stretch: [Q] int64."""
    Q = min(QUERIES_PER_ROW, S)
    return ((torch.arange(Q, device=device) * 2 + 1) * S) // (2 * Q)


def _document_bounds(doc_ids_S: torch.Tensor | None, S: int) -> list[tuple[int, int]]:
    """[start, end) of each document of a row (the whole row when it is one sequence)."""
    if doc_ids_S is None:
        return [(0, S)]
    starts = [0, *(torch.nonzero(doc_ids_S[1:] != doc_ids_S[:-1]).flatten() + 1).tolist(), S]
    return list(zip(starts[:-1], starts[1:], strict=True))


def _moba_keys(
    q_BSHd: torch.Tensor, k_BSHd: torch.Tensor, seq: SequenceInfo, pos_Q: torch.Tensor, block_size: int, topk: int
) -> torch.Tensor:
    """The keys MoBA lets each sampled query read, within its document: bool [B, H, Q, S]."""
    B, S, H, _ = q_BSHd.shape
    allowed_BHQS = torch.zeros(B, H, len(pos_Q), S, dtype=torch.bool, device=q_BSHd.device)
    positions = pos_Q.tolist()
    for b in range(B):
        doc_ids_S = seq.doc_ids_BS[b] if seq.doc_ids_BS is not None else None
        for start, end in _document_bounds(doc_ids_S, S):
            sampled = [i for i, t in enumerate(positions) if start <= t < end]
            if not sampled:
                continue
            # Blocks count from the document's first key, as MoBA's op reads packed documents.
            chosen_HLn = moba_selection(q_BSHd[b, start:end], k_BSHd[b, start:end], block_size, topk)
            block_L = torch.arange(end - start, device=q_BSHd.device) // block_size
            for i in sampled:
                allowed_BHQS[b, :, i, start:end] = chosen_HLn[:, positions[i] - start, block_L]
    return allowed_BHQS


@torch.no_grad()
def sampled_entropy(
    q_BSHd: torch.Tensor, k_BSKd: torch.Tensor, seq: SequenceInfo, moba: tuple[int, int] | None = None
) -> torch.Tensor:
    """Entropy (nats) of the attention rows of the sampled queries, every head: [B, H, Q], fp32
    (fp64 stays fp64). `moba` (block_size, topk) for a layer that runs MoBA."""
    B, S, H, d = q_BSHd.shape
    compute = torch.promote_types(q_BSHd.dtype, torch.float32)
    pos_Q = sample_positions(S, q_BSHd.device)
    k_BSHd = k_BSKd.to(compute).repeat_interleave(H // k_BSKd.shape[2], dim=2)
    q_BQHd = q_BSHd[:, pos_Q].to(compute)
    scores_BHQS = torch.einsum("bqhd,bshd->bhqs", q_BQHd, k_BSHd) * d**-0.5
    allowed_BQS = (torch.arange(S, device=q_BSHd.device).view(1, 1, S) <= pos_Q.view(1, -1, 1)).expand(B, -1, -1)
    if seq.doc_ids_BS is not None:
        allowed_BQS = allowed_BQS & (seq.doc_ids_BS[:, pos_Q].unsqueeze(-1) == seq.doc_ids_BS.unsqueeze(1))
    allowed_BHQS = allowed_BQS.unsqueeze(1)
    if moba is not None:
        allowed_BHQS = allowed_BHQS & _moba_keys(q_BSHd.to(compute), k_BSHd, seq, pos_Q, *moba)
    log_p = F.log_softmax(scores_BHQS.masked_fill(~allowed_BHQS, float("-inf")), dim=-1)
    # Masked keys have p = 0 and contribute nothing (0 * -inf would be NaN).
    return -(log_p.exp() * log_p.masked_fill(~allowed_BHQS, 0.0)).sum(-1)


class EntropyProbe:
    """The sampled entropies one attention layer saw during a probed step: their sum and count."""

    def __init__(self):
        self.total: torch.Tensor | None = None
        self.count = 0

    @torch.compiler.disable
    def record(self, q_BSHd, k_BSKd, seq: SequenceInfo, moba: tuple[int, int] | None) -> None:
        # Outside any compiled graph: it runs at probed steps only, and keeps Python state.
        entropy_BHQ = sampled_entropy(q_BSHd.detach(), k_BSKd.detach(), seq, moba)
        total = entropy_BHQ.sum(dtype=torch.float64)
        self.total = total if self.total is None else self.total + total
        self.count += entropy_BHQ.numel()


def set_entropy_probes(model: nn.Module, on: bool) -> None:
    """Give every attention layer of `model` a fresh probe (the next step is probed), or none."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.entropy_probe = EntropyProbe() if on else None


Reducer = Callable[[torch.Tensor], torch.Tensor]


def attention_entropy(model: nn.Module, reduce: Reducer | None = None) -> dict[str, float]:
    """Per layer of `model` (this rank's): "attention/layer{i}/entropy", the mean sampled entropy of
    the probed step, its sum and count first summed over ranks by `reduce` (None: one process)."""
    names, sums = [], []
    for block in (m for m in model.modules() if isinstance(m, Block)):
        probe = block.attention.entropy_probe
        if probe is not None and probe.count:
            names.append(f"attention/layer{block.layer_id}/entropy")
            sums.append(torch.stack([probe.total, torch.full_like(probe.total, probe.count)]))
    if not sums:
        return {}
    totals = torch.stack(sums)
    if reduce is not None:
        totals = reduce(totals)
    return {name: total / count for name, (total, count) in zip(names, totals.tolist(), strict=True)}
