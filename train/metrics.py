"""Metric sinks: TensorBoard scalars and a JSONL file under the run folder, and optionally
Weights & Biases (train/wandb_run.py).

All append, so a resumed run continues the same files (and W&B run). Only one process (rank 0)
should write; others construct the logger with `enabled=False` and every call is a
no-op there.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sparsetron.train.config import MetricsConfig
from sparsetron.train.wandb_run import WandbRun

__all__ = ["MetricsLogger", "memory_stats"]

JSONL_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsLogger:
    """Writes one set of named scalars per logged step.

    `start_step` (a resumed run's first step) drops TensorBoard events at or after it
    that an interrupted earlier attempt wrote, so curves do not fold back on
    themselves; metrics.jsonl keeps every line, and a reader takes the last line
    of a step.
    """

    def __init__(
        self,
        cfg: MetricsConfig,
        run_dir: str | Path,
        enabled: bool = True,
        start_step: int | None = None,
        run_config: dict[str, Any] | None = None,
    ):
        """`run_config` (the whole job, as a dict) is logged to W&B with metrics.wandb."""
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._writer = None
        self._jsonl = None
        self._wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.wandb:
            # First: it is the one sink that can refuse to start (no login), before files are opened.
            self._wandb = WandbRun(cfg, self.run_dir, run_config or {}, resumed=start_step is not None)
        if cfg.tensorboard:
            # Imported here: tensorboard is slow to import and absent from some installs.
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR), purge_step=start_step)
        if cfg.jsonl:
            self._jsonl = open(self.run_dir / JSONL_FILE, "a", encoding="utf-8")

    def log(self, step: int, scalars: dict[str, Any], histograms: dict[str, torch.Tensor] | None = None) -> None:
        """Record `scalars` (numbers or one-element tensors) and `histograms` (1-D tensors,
        e.g. tokens per expert; TensorBoard histograms, lists in the JSONL) at `step`."""
        if not self.enabled:
            return
        values = {name: _to_float(value) for name, value in scalars.items()}
        vectors = {name: t.detach().cpu().double() for name, t in (histograms or {}).items()}
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(name, value, global_step=step)
            for name, vector in vectors.items():
                self._writer.add_histogram(name, vector, global_step=step)
            self._writer.flush()
        if self._wandb is not None:
            self._wandb.log(step, values)
        if self._jsonl is not None:
            # Strict JSON has no NaN/inf: they become null so that any reader can parse the line.
            record = {"step": step, **{k: v if math.isfinite(v) else None for k, v in values.items()}}
            record.update({name: vector.tolist() for name, vector in vectors.items()})
            record["time"] = time.time()
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()

    def close(self, failed: bool = False) -> None:
        """`failed`: the run ends with an error (W&B marks the run failed)."""
        if self._wandb is not None:
            self._wandb.finish(failed)
            self._wandb = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        self.close(failed=exc_type is not None)


def _to_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().item())
    return float(value)


def memory_stats(device: torch.device | str) -> dict[str, float]:
    """Peak memory so far, in GiB; the caller adds a group prefix ("memory/") to the names.

    CUDA: the caching allocator's peak allocated and reserved bytes on that device
    (max_allocated_gib, max_reserved_gib). Otherwise: the peak resident set size of
    this process (max_rss_gib).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return {
            "max_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "max_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux but in bytes on macOS.
    peak_bytes = peak if sys.platform == "darwin" else peak * 1024
    return {"max_rss_gib": peak_bytes / 2**30}
