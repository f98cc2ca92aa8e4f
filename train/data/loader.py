"""Batches for training and evaluation, with a read position that survives restarts.

The training order is a pure function of (seed, epoch), and the loader's state is just
(epoch, index), so a loader restored from a checkpoint yields exactly the batches the
interrupted one would have yielded next, with no data skipped or repeated. A blend of
several sources (`data.blend`) is read by `blend.BlendLoader`, whose state is as small.

Shapes: B = micro_batch_size, W = world_size (data-parallel ranks), A = grad_accum_steps,
G = B * W * A (the global batch), S = seq_len.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sparsetron.train.config import DataConfig
from sparsetron.train.data.batch import Batch, StepShape, batch_of
from sparsetron.train.data.blend import BlendedWindows, BlendLoader, source_names
from sparsetron.train.data.errors import DataError
from sparsetron.train.data.packing import PackedDataset, split_train_val
from sparsetron.train.data.skipped import Tally, skipped_lines
from sparsetron.train.data.sources import Documents, load_documents, megatron_documents
from sparsetron.train.data.tokenizer import TokenizerLike

__all__ = ["Batch", "TrainLoader", "TrainingData", "build_datasets", "build_training_data", "eval_batches"]


def _batch(dataset, indices: np.ndarray) -> Batch:
    return batch_of(dataset.gather(indices))


def _packed(docs: Documents, cfg: DataConfig) -> PackedDataset:
    return PackedDataset(docs.tokens, docs.doc_starts, cfg.seq_len, cfg.mask_eos_target)


def _split(docs: Documents, cfg: DataConfig) -> tuple[PackedDataset, PackedDataset | None]:
    """All of `docs` for training when data.val_paths holds the validation data, else a held-out tail."""
    if cfg.val_paths:
        return _packed(docs, cfg), None
    if docs.n_documents == 1 and cfg.source == "text" and cfg.text_documents == "file":
        raise DataError(
            "need at least 2 documents to split off validation data, got 1: a text file is one document; "
            "set data.text_documents=paragraph or line to split it (or name validation files in data.val_paths)"
        )
    return split_train_val(docs.tokens, docs.doc_starts, cfg.seq_len, cfg.val_fraction, cfg.mask_eos_target)


@dataclass
class SourceSplit:
    """One source as the trainer reads it, for the data summary."""

    name: str
    weight: float
    train: PackedDataset
    val: PackedDataset | None
    """Its held-out documents; None when data.val_paths holds the validation data."""


def _one_source(cfg: DataConfig, tokenizer: TokenizerLike) -> tuple[SourceSplit, PackedDataset, list[Tally]]:
    """The one source's split, its validation windows (held out, else data.val_paths), and the inputs' tallies."""
    docs = load_documents(cfg, tokenizer)
    train, val = _split(docs, cfg)
    tallies = docs.tallies
    split = SourceSplit(docs.source, 1.0, train, val)
    if val is None:
        val_docs = load_documents(cfg, tokenizer, cfg.val_paths)
        val, tallies = _packed(val_docs, cfg), tallies + val_docs.tallies
    return split, val, tallies


def build_datasets(cfg: DataConfig, tokenizer: TokenizerLike) -> tuple[PackedDataset, PackedDataset]:
    """The (train, val) windows of one source: val is data.val_paths, else the last documents."""
    split, val, _ = _one_source(cfg, tokenizer)
    return split.train, val


def _count(n: int) -> str:
    """A count for the console: 1,234 below a million, else 5.6M (or 7.8B)."""
    for size, suffix in ((1e9, "B"), (1e6, "M")):
        if n >= size:
            return f"{n / size:.1f}{suffix}"
    return f"{n:,}"


def _counted(n: int, noun: str) -> str:
    return f"{_count(n)} {noun}{'' if n == 1 else 's'}"


def _describe(ds: PackedDataset) -> str:
    return f"{_counted(ds.n_documents, 'document')}, {_counted(ds.n_tokens, 'token')}, {_counted(len(ds), 'window')}"


@dataclass
class TrainingData:
    """What the trainer reads: the loader of its training batches and the fixed evaluation batches."""

    loader: TrainLoader | BlendLoader
    eval_set: list[Batch]
    train: list[PackedDataset]
    """Each source's training windows (one unless data.blend names several)."""
    val: PackedDataset | BlendedWindows
    sources: list[SourceSplit] = field(default_factory=list)
    """Each source: what it is, its weight, its train and held-out windows."""
    tallies: list[Tally] = field(default_factory=list)
    """Records read and skipped per input tokenized at train time."""

    def summary(self, steps: int, sequences_per_step: int) -> list[str]:
        """Console lines: each source's documents, tokens and split, the epochs that `steps`
        global batches of `sequences_per_step` windows read, and the records skipped.

        Counts come from the document index and the windows' lengths: nothing is scanned.
        """
        reads = steps * sequences_per_step
        total_weight = sum(s.weight for s in self.sources)
        blend = len(self.sources) > 1
        lines = []
        for s in self.sources:
            documents = s.train.n_documents + (s.val.n_documents if s.val is not None else 0)
            tokens = s.train.n_tokens + (s.val.n_tokens if s.val is not None else 0)
            held_out = f"; validation {_describe(s.val)}" if s.val is not None else ""
            # A blend's source is read in proportion to its weight.
            share = s.weight / total_weight
            epochs = f"; {reads * share / len(s.train):.3g} epochs" if blend else ""
            weight = f" (weight {share:.0%})" if blend else ""
            lines.append(
                f"data: {s.name}{weight}: {_counted(documents, 'document')}, {_counted(tokens, 'token')}; "
                f"train {_describe(s.train)}{held_out}{epochs}"
            )
        if all(s.val is None for s in self.sources):
            lines.append(f"data: validation (data.val_paths): {_describe(self.val)}")
        what = "windows of all sources" if blend else "windows"
        train_windows = sum(len(s.train) for s in self.sources)
        lines.append(
            f"data: {steps:,} steps x {sequences_per_step:,} sequences = {_count(reads)} of {_count(train_windows)} "
            f"training {what} ({reads / train_windows:.3g} epochs)"
        )
        lines.extend(f"data: {line}" for line in skipped_lines(self.tallies))
        return lines


def build_training_data(
    cfg: DataConfig,
    tokenizer: TokenizerLike,
    micro_batch_size: int,
    n_eval: int,
    rank: int = 0,
    world_size: int = 1,
    grad_accum_steps: int = 1,
) -> TrainingData:
    if not cfg.blend:
        split, val, tallies = _one_source(cfg, tokenizer)
        train = split.train
        loader = TrainLoader(train, micro_batch_size, cfg.seed, rank, world_size, grad_accum_steps)
        return TrainingData(loader, eval_batches(val, micro_batch_size, n_eval), [train], val, [split], tallies)
    weights = [w for w, _ in cfg.blend]
    sources = [s for _, s in cfg.blend]
    limit = cfg.max_documents or None
    trains, vals, splits = [], [], []
    for i, source in enumerate(sources):
        try:
            train, val = _split(megatron_documents([source], tokenizer, limit), cfg)
        except DataError as e:
            raise DataError(f"data.blend[{i}] ({source}): {e}") from e
        trains.append(train)
        vals.append(val)
        splits.append(SourceSplit(source, weights[i], train, val))
    names = source_names(sources)
    loader = BlendLoader(trains, weights, names, micro_batch_size, cfg.seed, rank, world_size, grad_accum_steps)
    if cfg.val_paths:
        val = _packed(load_documents(cfg, tokenizer, cfg.val_paths), cfg)
    else:
        val = BlendedWindows(vals, weights, max(n_eval, 1) * micro_batch_size)
    return TrainingData(loader, eval_batches(val, micro_batch_size, n_eval), trains, val, splits)


class TrainLoader:
    """Endless steps of micro-batches of `dataset`, epoch after epoch, each epoch freshly shuffled.

    Every step consumes one global batch of G = B*W*A windows from the epoch's permutation, and
    each rank keeps its A micro-batches of B windows (`StepShape`), so ranks never overlap. An
    epoch ends when fewer than G windows remain (those few wait for the next epoch's shuffle).
    What a step reads thus depends on G alone: a layout with other B, W, A and the same G reads
    the same windows at every step, and resumes from the other's state.
    """

    def __init__(
        self,
        dataset: PackedDataset,
        micro_batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        grad_accum_steps: int = 1,
    ):
        self.shape = StepShape(micro_batch_size, grad_accum_steps, rank, world_size)
        self.global_batch = self.shape.global_batch
        if len(dataset) < self.global_batch:
            raise DataError(
                f"training split has {len(dataset)} windows of seq_len {dataset.seq_len} "
                f"({dataset.n_tokens} tokens), fewer than one global batch of {self.shape.describe()}"
            )
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0
        self.index = 0  # windows of this epoch's permutation already consumed (all ranks)
        self._positions = self.shape.positions()
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // self.global_batch

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng((self.seed, epoch)).permutation(len(self.dataset))
            self._perm_epoch = epoch
        return self._perm

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> list[Batch]:
        """This rank's micro-batches of the next step, in order."""
        # Roll over lazily, on the next read: the state saved after an epoch's last
        # step then still reads (epoch, end), and resuming from it rolls identically.
        if self.index + self.global_batch > len(self.dataset):
            self.epoch += 1
            self.index = 0
        step = self._permutation(self.epoch)[self.index : self.index + self.global_batch]
        self.index += self.global_batch
        return [_batch(self.dataset, step[row]) for row in self._positions]

    @property
    def notices(self) -> list[str]:
        return []  # one source: its epochs are counted in scalars()

    def scalars(self) -> dict[str, float]:
        """Epochs of the training split read so far (all ranks), for TensorBoard."""
        return {"data/epochs": self.epoch + self.index / len(self.dataset)}

    def state_dict(self) -> dict[str, int]:
        """The read position: windows of the epoch's order consumed, where the next step begins (the
        same on every rank and for every layout of the same global batch)."""
        return {"epoch": int(self.epoch), "index": int(self.index)}

    def load_state_dict(self, state: dict) -> None:
        try:
            epoch, index = int(state["epoch"]), int(state["index"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"data loader state must hold integer 'epoch' and 'index', got {state!r}") from e
        if epoch < 0 or not 0 <= index <= len(self.dataset):
            raise DataError(f"data loader state {state!r} does not fit a training split of {len(self.dataset)} windows")
        self.epoch, self.index = epoch, index


def eval_batches(dataset: PackedDataset | BlendedWindows, micro_batch_size: int, n: int) -> list[Batch]:
    """The first n micro-batches of `dataset` in order, the same at every call.

    A split smaller than n batches gives as many full batches as it holds; one smaller
    than a single batch gives one short batch of all its windows. n = 0 gives none.
    """
    if micro_batch_size < 1:
        raise DataError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if n <= 0:
        return []
    if len(dataset) < micro_batch_size:
        return [_batch(dataset, np.arange(len(dataset)))]
    count = min(n, len(dataset) // micro_batch_size)
    return [_batch(dataset, np.arange(i * micro_batch_size, (i + 1) * micro_batch_size)) for i in range(count)]
