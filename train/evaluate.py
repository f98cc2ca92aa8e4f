"""`sparsetron eval`: a checkpoint's loss and perplexity on validation data, in one process.

    sparsetron eval runs/tiny                                   # newest complete checkpoint of the run
    sparsetron eval runs/tiny/checkpoints/step_00000300 --batches 32
    sparsetron eval runs/tiny --data held_out.txt --set data.source=text

The checkpoint is a step folder, a folder of step folders (its newest complete one), or a run
folder (trainer.run_dir: the step folders under its checkpoints/). Its files are verified
against the sizes and checksums of its marker, as a resume does, and only the model's weights
are read (no optimizer state). The model is built from the checkpoint's config.yaml on
trainer.device, computes in trainer.precision, and evaluates the batches the trainer evaluates:
the first trainer.eval_batches micro-batches of the validation data (data.val_paths, else the
held-out tail of the training data), so the loss equals the one the run recorded at that step.
`--data` files (in data.source's format) replace the validation data. Loss is the mean over
micro-batches of their mean cross-entropy per target token (the trainer's eval/loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsetron.model.attention import set_full_attention
from sparsetron.model.config import ConfigError
from sparsetron.model.transformer import Transformer, materialised_transformer
from sparsetron.parallel.dims import ParallelDims
from sparsetron.parallel.precision import Precision
from sparsetron.parallel.step import StepRunner
from sparsetron.train.checkpoint import CheckpointManager, is_complete, list_complete, step_of
from sparsetron.train.config import JobConfig
from sparsetron.train.config_io import apply_override, from_dict
from sparsetron.train.data import (
    Batch,
    PackedDataset,
    build_tokenizer,
    build_training_data,
    eval_batches,
    load_documents,
)
from sparsetron.train.data.packing import IGNORE_TARGET
from sparsetron.train.trainer import resolve_device

__all__ = [
    "EvalResult",
    "eval_loss",
    "evaluate_checkpoint",
    "find_checkpoint",
    "checkpoint_job",
    "load_model",
    "open_checkpoint",
    "validation_batches",
]

RUN_CHECKPOINTS = "checkpoints"
"""Where a run folder keeps its step folders by default (JobConfig.checkpoint_folder)."""


@dataclass
class EvalResult:
    checkpoint: Path
    step: int
    loss: float
    batches: int
    tokens: int
    """Target tokens the loss averages over."""
    data: str
    """Which validation data: "data.val_paths" or "the held-out validation split"."""

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf

    def describe(self) -> str:
        return (
            f"{self.checkpoint} (step {self.step}): eval loss {self.loss:.4f}, perplexity {self.perplexity:.2f}, "
            f"over {self.tokens:,} tokens ({self.batches} batches of {self.data})"
        )


def find_checkpoint(path: str | Path) -> tuple[CheckpointManager, Path]:
    """The manager and the verified step folder `path` names: itself, its newest complete step
    folder, or a run folder's newest one (under checkpoints/). Raises CheckpointError."""
    folder = Path(path).expanduser()
    run_checkpoints = folder / RUN_CHECKPOINTS
    if folder.is_dir() and not is_complete(folder) and step_of(folder) is None and not list_complete(folder):
        if run_checkpoints.is_dir():
            folder = run_checkpoints
    manager = CheckpointManager(folder)
    return manager, manager.resolve(str(folder))


def evaluate_checkpoint(
    path: str | Path,
    data_paths: list[str] | None = None,
    overrides: list[str] | None = None,
    batches: int | None = None,
) -> EvalResult:
    """Evaluate the checkpoint `path` names (see the module docstring); `data_paths` become
    data.val_paths and `batches` trainer.eval_batches, after `overrides` (`section.key=value`)
    changed the checkpoint's config. Bad input raises ConfigError, CheckpointError or DataError
    before the model is built where it can."""
    manager, folder, job = open_checkpoint(path, data_paths, overrides, batches)
    if job.trainer.eval_batches < 1:
        raise ConfigError(f"checkpoint {folder}: trainer.eval_batches is 0 in its config; give --batches N")
    batch_list, data = validation_batches(job)
    model, step = load_model(manager, folder, job)
    return EvalResult(
        folder, step, eval_loss(model, job, batch_list), len(batch_list), _target_tokens(batch_list), data
    )


def open_checkpoint(
    path: str | Path,
    data_paths: list[str] | None = None,
    overrides: list[str] | None = None,
    batches: int | None = None,
) -> tuple[CheckpointManager, Path, JobConfig]:
    """The manager, verified step folder and job config of the checkpoint `path` names, its
    config changed as `evaluate_checkpoint` describes; nothing is read but its config."""
    manager, folder = find_checkpoint(path)
    return manager, folder, checkpoint_job(manager.read_config(folder), folder, data_paths, overrides or [], batches)


def validation_batches(job: JobConfig) -> tuple[list[Batch], str]:
    """The first trainer.eval_batches micro-batches the trainer evaluates on (data.val_paths, else
    the held-out split), and which data that is."""
    tc = job.trainer
    tokenizer = build_tokenizer(job.data.tokenizer)
    if job.data.val_paths:
        docs = load_documents(job.data, tokenizer, job.data.val_paths)
        val = PackedDataset(docs.tokens, docs.doc_starts, job.data.seq_len, job.data.mask_eos_target)
        return eval_batches(val, tc.micro_batch_size, tc.eval_batches), "data.val_paths"
    batch_list = build_training_data(job.data, tokenizer, tc.micro_batch_size, tc.eval_batches).eval_set
    return batch_list, "the held-out validation split"


def load_model(manager: CheckpointManager, folder: Path, job: JobConfig) -> tuple[Transformer, int]:
    """The model of `job` on trainer.device with the weights of step folder `folder`, attending as
    the run's last step before it trained (MoBA's switch to full attention); and that step."""
    model = materialised_transformer(job.model, job.attention, job.moe, resolve_device(job.trainer.device))
    step = manager.load(folder, model)["step"]
    switch = job.attention.moba_switch_step(job.trainer.steps)
    if switch is not None:
        # As the trainer evaluates after `step` steps: attending as its last step trained.
        set_full_attention(model, max(step - 1, 0) >= switch)
    return model, step


def eval_loss(model: Transformer, job: JobConfig, batch_list: list[Batch]) -> float:
    """The trainer's eval/loss of `model` (on trainer.device, in trainer.precision) over `batch_list`."""
    tc = job.trainer
    device = next(model.parameters()).device
    precision = Precision.from_config(tc.precision, device)
    runner = StepRunner(model, None, None, ParallelDims(), precision, 1, tc.micro_batch_size, job.data.seq_len, device)
    with torch.no_grad():
        return runner.eval_loss(batch_list)


def checkpoint_job(
    saved: dict, folder: Path, data_paths: list[str] | None, overrides: list[str], batches: int | None
) -> JobConfig:
    """The validated job of a checkpoint's config.yaml mapping `saved` (changed in place) after
    `overrides`, with `batches` as trainer.eval_batches and `data_paths` as data.val_paths."""
    for item in overrides:
        apply_override(saved, item)
    if batches is not None:
        if batches < 1:
            raise ConfigError(f"--batches must be at least 1, got {batches}")
        saved.setdefault("trainer", {})["eval_batches"] = batches
    if data_paths:
        data = saved.setdefault("data", {})
        if data.get("source", "stdlib") == "stdlib":
            raise ConfigError(
                f"--data: checkpoint {folder} trained on data.source stdlib, which reads no files; "
                "name the files' format with --set data.source=text|jsonl|parquet|hf|megatron"
            )
        data["val_paths"] = list(data_paths)
        if not data.get("paths") and not data.get("blend"):
            data["paths"] = list(data_paths)  # a file source needs some; evaluation reads only val_paths
    try:
        job = from_dict(JobConfig, saved, "")
        job.validate()
    except ConfigError as err:
        raise ConfigError(f"checkpoint {folder}: its config.yaml with the changes given: {err}") from err
    return job


def _target_tokens(batches: list[Batch]) -> int:
    return sum(int((batch.targets != IGNORE_TARGET).sum()) for batch in batches)
