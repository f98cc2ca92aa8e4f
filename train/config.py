"""The job configuration: one typed section per component.

A YAML recipe mirrors these sections. Loading, overrides and dumping live in
`train/config_io.py`; cross-section checks live in `JobConfig.validate`, which runs
once, after every override has been applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from sparsetron.model.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig, check
from sparsetron.parallel.config import ParallelConfig
from sparsetron.train.data.skipped import MAX_SKIPPED_FRACTION

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "JobConfig",
    "MetricsConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "TrainerConfig",
]

FILE_SOURCES = ("text", "jsonl", "parquet", "hf", "megatron")


@dataclass
class DataConfig:
    """Where tokens come from and how they are packed."""

    # A saved read position points into the sequences these fields produce.
    POSITION_FIELDS: ClassVar[tuple[str, ...]] = (
        "source",
        "paths",
        "val_paths",
        "blend",
        "text_key",
        "text_documents",
        "tokenizer",
        "seq_len",
        "val_fraction",
        "max_documents",
        "seed",
    )

    source: Literal["stdlib", "text", "jsonl", "parquet", "hf", "megatron"] = "stdlib"
    """stdlib: the source of Python's standard library (no download). text (a file is a document, or see data.text_documents), jsonl (also .gz, .zst), parquet, hf (a dataset saved with save_to_disk): local files, tokenized once into data.cache_dir. megatron: indexed .bin/.idx data (`sparsetron prepare` writes it)."""
    paths: list[str] = field(default_factory=list)
    """Files or glob patterns for text/jsonl/parquet, dataset folders for hf; for megatron, path prefixes (without .bin/.idx) or folders of them."""
    val_paths: list[str] = field(default_factory=list)
    """Validation data in data.source's format, instead of holding out data.val_fraction: all of data.paths (or data.blend) then trains."""
    blend: list[tuple[float, str]] = field(default_factory=list)
    """[[weight, source], ...] with data.source megatron and data.paths empty: each source a prefix or a folder of prefixes (`sparsetron prepare --per-file` writes one), drawn in proportion to its weight; a source that runs out starts its next epoch."""
    text_key: str = "text"
    """Column holding the document text in jsonl, parquet and hf data."""
    text_documents: Literal["file", "paragraph", "line"] = "file"
    """How a text file splits into documents: file = the whole file is one; paragraph = runs of non-blank lines, split at blank (empty or whitespace) lines; line = each non-blank line."""
    max_skipped_fraction: float = MAX_SKIPPED_FRACTION
    """Largest share of one input's records (jsonl and text lines, parquet and hf rows) that may be malformed (invalid JSON, not an object, no data.text_key, a text that is not a string, not UTF-8): they are skipped and reported at start; above it the run stops naming the file (0 = any malformed record stops it). Empty records are skipped and reported but allowed; an input yielding no document always stops it."""
    tokenizer: str = "byte"
    """byte: UTF-8 bytes plus an end-of-document token. Otherwise a local tokenizer.json file (or a folder holding one) for Hugging Face `tokenizers`."""
    seq_len: int = 256
    """Tokens per training sequence; documents are packed into sequences of this length."""
    val_fraction: float = 0.01
    """Fraction of documents held out for validation (the last ones, after the source's own order; of each source in a blend)."""
    max_documents: int = 0
    """Use at most this many documents of the source (0 = all)."""
    seed: int = 1234
    """Seed of the document order (stdlib) and of each epoch's sequence order."""
    mask_eos_target: bool = False
    """Ignore in the loss the target of each document's last token (the eos), which is the next document's first token."""
    cache_dir: str = ""
    """Where text/jsonl/parquet/hf data is tokenized to, once per content ('' = $SPARSETRON_DATA_CACHE, else ~/.cache/sparsetron/data)."""
    max_tokenize_gb: float = 10.0
    """Largest text/jsonl/parquet/hf corpus (GB on disk) train tokenizes itself; a larger one is refused with the `sparsetron prepare` command to run instead (0 = no limit)."""

    def validate(self, prefix: str = "data") -> None:
        if self.blend:
            check(self.source == "megatron", f"{prefix}.blend", f"needs data.source megatron, got '{self.source}'")
            check(not self.paths, f"{prefix}.paths", "must be empty when data.blend names the sources")
            for i, (weight, source) in enumerate(self.blend):
                check(math.isfinite(weight) and weight > 0, f"{prefix}.blend[{i}]", f"weight must be > 0, got {weight}")
                check(bool(source), f"{prefix}.blend[{i}]", "source must name a prefix or folder")
        elif self.source in FILE_SOURCES:
            check(bool(self.paths), f"{prefix}.paths", f"source '{self.source}' needs at least one path")
        check(
            not (self.val_paths and self.source == "stdlib"),
            f"{prefix}.val_paths",
            "source 'stdlib' has no files; use data.val_fraction",
        )
        check(self.seq_len >= 2, f"{prefix}.seq_len", f"must be >= 2, got {self.seq_len}")
        check(
            0.0 < self.val_fraction < 1.0,
            f"{prefix}.val_fraction",
            f"must be strictly between 0 and 1, got {self.val_fraction}",
        )
        check(self.max_documents >= 0, f"{prefix}.max_documents", f"must be >= 0, got {self.max_documents}")
        check(self.max_tokenize_gb >= 0, f"{prefix}.max_tokenize_gb", f"must be >= 0, got {self.max_tokenize_gb}")
        check(
            0 <= self.max_skipped_fraction <= 1,
            f"{prefix}.max_skipped_fraction",
            f"must be in [0, 1], got {self.max_skipped_fraction}",
        )


@dataclass
class OptimizerConfig:
    """AdamW with decoupled weight decay on matrices only."""

    lr: float = 3e-3
    """Peak learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam's (beta1, beta2)."""
    eps: float = 1e-8
    """Adam's epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay for weight matrices and experts; norms, biases and embeddings get none."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping, the norm is still reported)."""

    def validate(self, prefix: str = "optimizer") -> None:
        check(self.lr > 0, f"{prefix}.lr", f"must be > 0, got {self.lr}")
        check(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            f"{prefix}.betas",
            f"must be two numbers in [0, 1), got {self.betas}",
        )
        check(self.eps > 0, f"{prefix}.eps", f"must be > 0, got {self.eps}")
        check(self.weight_decay >= 0, f"{prefix}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(self.grad_clip >= 0, f"{prefix}.grad_clip", f"must be >= 0, got {self.grad_clip}")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, as a multiple of optimizer.lr per step."""

    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    """cosine: warmup then cosine decay to min_lr_ratio. wsd: warmup, stable, then linear decay over the last decay_fraction of steps. constant: warmup then flat."""
    warmup_steps: int | float = 20
    """Steps of linear warmup from 0: a whole number counts steps; a number in (0, 1) is a fraction of trainer.steps (0.1 = the first 10%, rounded to the nearest step, a half to even), so a shorter or longer run keeps its shape."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    decay_fraction: float = 0.2
    """wsd only: fraction of all steps spent decaying."""

    def warmup_for(self, steps: int) -> int:
        """The warm-up in steps of a run of `steps` steps."""
        if 0 < self.warmup_steps < 1:
            return round(self.warmup_steps * steps)
        return int(self.warmup_steps)

    def validate(self, steps: int, prefix: str = "schedule") -> None:
        """Checked against trainer.steps, which must be valid itself (JobConfig checks it first)."""
        warmup = self.warmup_steps
        check(
            warmup >= 0 and (warmup < 1 or float(warmup).is_integer()),
            f"{prefix}.warmup_steps",
            f"must be a whole number of steps or a fraction in (0, 1) of trainer.steps, got {warmup}",
        )
        check(
            self.warmup_for(steps) <= steps,
            f"{prefix}.warmup_steps",
            f"must be in [0, trainer.steps={steps}] (or a fraction below 1 of it), got {warmup}",
        )
        check(0 <= self.min_lr_ratio <= 1, f"{prefix}.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        check(
            0 < self.decay_fraction <= 1,
            f"{prefix}.decay_fraction",
            f"must be in (0, 1], got {self.decay_fraction}",
        )


@dataclass
class CheckpointConfig:
    """When and where checkpoints are written."""

    interval: int = 100
    """Save every this many steps (0 = only at the end)."""
    keep_last: int = 3
    """Complete checkpoints to keep; older ones are deleted after a newer one is committed (0 = keep all)."""
    folder: str = ""
    """Where step folders go. Empty = <trainer.run_dir>/checkpoints."""
    save_final: bool = True
    """Save when training ends (or stops at trainer.stop_at / on SIGTERM)."""
    on_corrupt: Literal["fallback", "error"] = "fallback"
    """A newest checkpoint whose files do not match the sizes and checksums in its .complete marker, met by `--resume auto`: fallback = resume from the newest older checkpoint that verifies and say which one was skipped and why; error = refuse to start. A checkpoint named explicitly must always verify. Nothing is deleted or renamed because of corruption (resuming an older checkpoint sets the newer ones aside as abandoned_*, as always)."""
    async_save: bool = False
    """Copy the state to CPU memory and write it in the background (DCP async_save): training waits only for the copy and needs memory for one more copy of the model and optimizer. A new save, and the end of training, first wait for the previous one to be committed."""

    def validate(self, prefix: str = "checkpoint") -> None:
        check(self.interval >= 0, f"{prefix}.interval", f"must be >= 0, got {self.interval}")
        check(self.keep_last >= 0, f"{prefix}.keep_last", f"must be >= 0, got {self.keep_last}")


@dataclass
class MetricsConfig:
    """What is logged, where, and how often."""

    log_interval: int = 10
    """Steps between logged metrics."""
    tensorboard: bool = True
    """Write TensorBoard scalars to <trainer.run_dir>/tensorboard."""
    jsonl: bool = True
    """Write one JSON object per logged step to <trainer.run_dir>/metrics.jsonl."""
    console: Literal["auto", "live", "plain", "none"] = "auto"
    """live: a progress line redrawn in place. plain: one line per log interval. auto: live on a terminal, plain otherwise."""
    peak_tflops: float = 0.0
    """Peak dense bf16 TFLOP/s of one accelerator for MFU (0 = look the device up; MFU is not reported on CPUs)."""
    profile_steps: list[int] = field(default_factory=list)
    """[first, last]: record a torch.profiler trace of these steps (1-based, inclusive) on every rank into <trainer.run_dir>/profile/rank<r>_steps<first>-<last>.pt.trace.json, for Perfetto (ui.perfetto.dev) or TensorBoard's profiler plugin ([] = off). A resumed run records the part of the range it still runs."""
    attention_entropy_interval: int = 0
    """Steps between logs of each layer's mean attention entropy (nats), attention/layer<i>/entropy: the entropy-collapse paper's signal (see model.sigma_reparam). Sampled at 16 query positions per row, every head, under the layer's exact mask (MoBA: its selected blocks), so a probed step costs little more. 0 = off. Not with parallel.context > 1."""
    wandb: bool = False
    """Also log the scalars to Weights & Biases (rank 0; needs `pip install 'sparsetron[wandb]'`). The W&B run is named after the run folder, and a resumed run continues it (its id is kept in <trainer.run_dir>/wandb_run_id)."""
    wandb_project: str = "sparsetron"
    """W&B project of metrics.wandb."""
    wandb_mode: Literal["auto", "online", "offline"] = "auto"
    """auto: $WANDB_MODE if set (e.g. WANDB_MODE=offline), else online. offline: write the W&B run under $WANDB_DIR (else <trainer.run_dir>) with no network, for `wandb sync` later."""

    def validate(self, steps: int, prefix: str = "metrics") -> None:
        check(self.log_interval >= 1, f"{prefix}.log_interval", f"must be >= 1, got {self.log_interval}")
        check(
            self.attention_entropy_interval >= 0,
            f"{prefix}.attention_entropy_interval",
            f"must be >= 0 (0 = off), got {self.attention_entropy_interval}",
        )
        check(self.peak_tflops >= 0, f"{prefix}.peak_tflops", f"must be >= 0, got {self.peak_tflops}")
        if self.profile_steps:
            window = self.profile_steps
            check(
                len(window) == 2 and 1 <= window[0] <= window[1] <= steps,
                f"{prefix}.profile_steps",
                f"must be [first, last] with 1 <= first <= last <= trainer.steps={steps}, got {self.profile_steps}",
            )
        check(bool(self.wandb_project), f"{prefix}.wandb_project", "must not be empty")


@dataclass
class TrainerConfig:
    """The training loop."""

    run_dir: str = "runs/default"
    """Folder for checkpoints, TensorBoard logs and metrics.jsonl."""
    steps: int = 100
    """Optimizer steps in the whole run (the schedule's length)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated into one optimizer step. With trainer.global_batch_size set it is derived from the layout: leave it at 1 (or give the derived value)."""
    global_batch_size: int = 0
    """Sequences per optimizer step over all data-parallel ranks (0 = micro_batch_size x grad_accum_steps x the data-parallel degree). When set, grad_accum_steps = global_batch_size / (micro_batch_size x data-parallel degree) for the layout the run starts on, so another layout, or a resume on one, trains the same batch on the same data order."""
    seed: int = 0
    """Seed of the weight initialisation and of torch's random state."""
    eval_interval: int = 50
    """Evaluate on the validation split every this many steps, and at steps 0 and the last (0 = only at 0 and the last)."""
    eval_batches: int = 8
    """Micro-batches in one evaluation."""
    stop_at: int = 0
    """Stop (after saving) at this step without changing the schedule, as a preemption would (0 = run all steps)."""
    max_hours: float = 0.0
    """Stop (after saving) once this many hours of wall time have passed since this process started the run,
    so a resumed job continues before a scheduler's time limit kills it (0 = no limit). The ranks agree on the
    step, as for a stop signal (SIGTERM, SIGINT, SIGUSR1)."""
    max_nonfinite_steps: int = 3
    """A step whose loss or gradient norm is NaN/inf is skipped and counted; stop after this many in a row."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = cuda when available, else cpu."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Autocast dtype of the forward: auto = bf16 on GPUs, fp32 on CPUs. Parameters stay fp32."""

    def validate(self, prefix: str = "trainer") -> None:
        for name in ("steps", "micro_batch_size", "grad_accum_steps", "eval_batches", "max_nonfinite_steps"):
            value = getattr(self, name)
            check(value >= 1, f"{prefix}.{name}", f"must be >= 1, got {value}")
        for name in ("eval_interval", "stop_at", "global_batch_size"):
            value = getattr(self, name)
            check(value >= 0, f"{prefix}.{name}", f"must be >= 0, got {value}")
        check(self.max_hours >= 0, f"{prefix}.max_hours", f"must be >= 0, got {self.max_hours}")
        check(
            self.stop_at <= self.steps,
            f"{prefix}.stop_at",
            f"must be <= trainer.steps={self.steps}, got {self.stop_at}",
        )
        check(bool(self.run_dir), f"{prefix}.run_dir", "must not be empty")


@dataclass
class JobConfig:
    """A whole training job: one field per YAML section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Transformer shape."""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    """Attention heads and positions."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture of Experts (num_experts 0 = dense)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and validation data."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """Logging."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Training loop."""

    def validate(self) -> None:
        """Check every section and the rules that tie sections together."""
        # A section is checked before any section checked against it, so that a bad value is
        # reported under its own key (trainer.steps=-5 as trainer.steps, not as schedule.warmup_steps).
        self.model.validate()
        self.trainer.validate()
        self.attention.validate(self.model)
        self.moe.validate(self.model)
        self.data.validate()
        self.optimizer.validate()
        self.schedule.validate(self.trainer.steps)
        self.checkpoint.validate()
        self.metrics.validate(self.trainer.steps)
        self.parallel.validate()
        if self.moe.enabled:
            self.moe.dispatcher_for(self.parallel.expert)
        check(
            not (self.metrics.attention_entropy_interval and self.parallel.context > 1),
            "metrics.attention_entropy_interval",
            f"is not supported with parallel.context={self.parallel.context}: a context rank's queries "
            "would need the whole keys to compute attention rows exactly; set 0",
        )
        check(
            self.data.seq_len <= self.model.max_seq_len,
            "data.seq_len",
            f"{self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}",
        )

    def checkpoint_folder(self) -> str:
        return self.checkpoint.folder or f"{self.trainer.run_dir}/checkpoints"
