"""Weighted blending of several sources, deterministic and resumable to the window.

Draw n of the blend (n = 0, 1, ...) comes from the source s that maximizes
w_s * (n + 1) - c_s, where w are the normalized weights and c_s the draws source s has
had so far (ties go to the lower index): after any n draws every source has had its
share to within one window, so the proportions are exact, not sampled. Source s's
draw c is window perm_s,e[c mod L_s] of its epoch e = c div L_s, perm_s,e being a
permutation seeded by (seed, s, e); a source that runs out thus wraps around into a
fresh order, and the loader says so once.

The whole state is the draw counts c [S] (the same on every rank): the schedule is a
pure function of them, so a loader restored from a checkpoint continues exactly. This
is megatron-core's blending rule (its `build_blending_indices` picks by the same
error), written here over windows so that the loader's state stays a few integers
instead of an index array the length of the run.

Shapes: S sources, B = micro_batch_size, W = data-parallel ranks, A = grad_accum_steps,
G = B * W * A (the global batch).
"""

from __future__ import annotations

import os

import numpy as np

from sparsetron.train.data.batch import Batch, StepShape, batch_of
from sparsetron.train.data.errors import DataError
from sparsetron.train.data.packing import PackedDataset

__all__ = ["BlendLoader", "BlendedWindows", "blend_schedule", "source_names"]


def source_names(sources: list[str]) -> list[str]:
    """Short distinct names for metrics: each source's last path component."""
    names = [os.path.basename(os.path.normpath(s)) or s for s in sources]
    return [name if names.count(name) == 1 else f"{name}.{i}" for i, name in enumerate(names)]


def blend_schedule(weights: np.ndarray, counts: np.ndarray, n: int, available: np.ndarray | None = None) -> np.ndarray:
    """The sources of the next n draws [n]; `counts` [S] is advanced in place.

    `available` [S] (optional) caps each source's draws: a source at its cap is passed
    over (for validation, which never wraps); the schedule ends early once all are.
    """
    share = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    picks = []
    total = int(counts.sum())
    for _ in range(n):
        error = share * (total + 1) - counts
        if available is not None:
            error = np.where(counts < available, error, -np.inf)
            if not np.isfinite(error).any():
                break
        s = int(np.argmax(error))
        counts[s] += 1
        total += 1
        picks.append(s)
    return np.asarray(picks, dtype=np.int64)


def _gather(datasets: list[PackedDataset], sources: np.ndarray, windows: np.ndarray):
    """(inputs, targets, doc_ids) [len, S] of window windows[i] of source sources[i]."""
    seq_len = datasets[0].seq_len
    out = [np.empty((len(sources), seq_len), dtype=np.int64) for _ in range(3)]
    for s in np.unique(sources).tolist():
        rows = np.nonzero(sources == s)[0]
        for o, part in zip(out, datasets[s].gather(windows[rows]), strict=True):
            o[rows] = part
    return tuple(out)


class BlendedWindows:
    """The first windows of a blend, in schedule order and without shuffling (for evaluation)."""

    def __init__(self, datasets: list[PackedDataset], weights: list[float], limit: int):
        self.datasets = datasets
        counts = np.zeros(len(datasets), dtype=np.int64)
        available = np.array([len(d) for d in datasets], dtype=np.int64)
        self.sources = blend_schedule(np.asarray(weights), counts, min(limit, int(available.sum())), available)
        # The k-th draw of a source is its window k.
        self.windows = np.empty_like(self.sources)
        for s in range(len(datasets)):
            mask = self.sources == s
            self.windows[mask] = np.arange(int(mask.sum()))
        self.seq_len = datasets[0].seq_len

    def __len__(self) -> int:
        return len(self.sources)

    def gather(self, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return _gather(self.datasets, self.sources[idx], self.windows[idx])


class BlendLoader:
    """Endless steps of micro-batches drawn from several sources in proportion to `weights`.

    Every step consumes one global batch of G draws, and each rank keeps its A micro-batches of
    B of them (`StepShape`): the schedule is a function of the draw counts alone, so what a step
    reads depends on G, not on how a layout splits it. `notices` collects one message per source
    when it first runs out (the trainer prints them); `scalars()` gives each source's consumed
    tokens and epochs.
    """

    def __init__(
        self,
        datasets: list[PackedDataset],
        weights: list[float],
        names: list[str],
        micro_batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        grad_accum_steps: int = 1,
    ):
        shape = StepShape(micro_batch_size, grad_accum_steps, rank, world_size)
        if not len(datasets) == len(weights) == len(names) or not datasets:
            raise DataError(f"a blend needs one weight and name per source, got {len(datasets)} sources")
        self.datasets = datasets
        self.weights = np.asarray(weights, dtype=np.float64)
        self.names = names
        self.seed = seed
        self.global_batch = shape.global_batch
        self._positions = shape.positions()
        self.lengths = np.array([len(d) for d in datasets], dtype=np.int64)
        self.counts = np.zeros(len(datasets), dtype=np.int64)
        self.notices: list[str] = []
        self._perms: dict[int, tuple[int, np.ndarray]] = {}

    def _window(self, s: int, draw: int) -> int:
        epoch, index = divmod(draw, int(self.lengths[s]))
        cached = self._perms.get(s)
        if cached is None or cached[0] != epoch:
            perm = np.random.default_rng((self.seed, s, epoch)).permutation(int(self.lengths[s]))
            self._perms[s] = cached = (epoch, perm)
        return int(cached[1][index])

    def __iter__(self) -> BlendLoader:
        return self

    def __next__(self) -> list[Batch]:
        """This rank's micro-batches of the next step, in order."""
        before = self.counts.copy()
        sources = blend_schedule(self.weights, self.counts, self.global_batch)
        # The c-th draw of source s in this step is its draw before[s] + c.
        draws = np.empty_like(sources)
        for s in np.unique(sources).tolist():
            mask = sources == s
            draws[mask] = before[s] + np.arange(int(mask.sum()))
        for s in np.nonzero((before <= self.lengths) & (self.counts > self.lengths))[0].tolist():
            self.notices.append(
                f"data: blend source {self.names[s]} ran out after {int(self.lengths[s])} windows "
                f"({int(self.lengths[s]) * self.datasets[s].seq_len:,} tokens) and wraps around into its next epoch"
            )
        micro_batches = []
        for row in self._positions:
            windows = np.array([self._window(s, d) for s, d in zip(sources[row], draws[row], strict=True)])
            micro_batches.append(batch_of(_gather(self.datasets, sources[row], windows)))
        return micro_batches

    def scalars(self) -> dict[str, float]:
        """Each source's tokens consumed (all ranks) and epochs, for TensorBoard."""
        out = {}
        for name, count, length, ds in zip(self.names, self.counts, self.lengths, self.datasets, strict=True):
            out[f"data/{name}/tokens"] = float(count * ds.seq_len)
            out[f"data/{name}/epochs"] = float(count / length)
        return out

    def state_dict(self) -> dict:
        return {"blend_draws": [int(c) for c in self.counts]}

    def load_state_dict(self, state: dict) -> None:
        draws = state.get("blend_draws") if isinstance(state, dict) else None
        if not isinstance(draws, list) or len(draws) != len(self.datasets) or any(int(c) < 0 for c in draws):
            raise DataError(
                f"data loader state {state!r} is not the position of a blend of {len(self.datasets)} sources"
            )
        self.counts = np.array(draws, dtype=np.int64)
