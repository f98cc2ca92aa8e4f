"""What the experiment scripts share: one `sparsetron train` run at a time on one thread, its
curves, parameter counts, step time and FLOPs, and a plot in the house style of train/plot.py.

A run that finished (its folder holds `experiment.json`, written after the command succeeded) is
read back instead of being trained again, so a script interrupted half-way resumes where it was;
`--fresh` in a script deletes its runs first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from sparsetron.model.params import active_params, num_params
from sparsetron.model.transformer import Transformer
from sparsetron.train.config import JobConfig
from sparsetron.train.config_io import from_dict
from sparsetron.train.flops import model_flops_per_token
from sparsetron.train.plot import DPI, read_series

__all__ = ["Run", "cli", "plot_curves", "start", "train"]

ROOT = Path("/tmp/sparsetron-experiments")
"""Where the run folders go (a user's /tmp: the checkpoints are throwaway)."""
MARKER = "experiment.json"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class Run:
    """A finished training run, read from its folder."""

    name: str
    folder: Path
    job: JobConfig
    wall_s: float
    """Wall time of the `sparsetron train` command(s) that made it."""

    @property
    def series(self) -> dict:
        return read_series(self.folder / "metrics.jsonl")

    def eval_losses(self) -> dict[int, float]:
        return self.series.get("eval/loss", {})

    def final_eval(self) -> float:
        losses = self.eval_losses()
        return losses[max(losses)]

    def params(self) -> tuple[int, int]:
        """(total, active per token) parameters; active leaves the input embedding out (model/params.py)."""
        job = self.job
        with torch.device("meta"):
            total = num_params(Transformer(job.model, job.attention, job.moe))
        return total, active_params(job.model, job.attention, job.moe)

    def flops_per_step(self) -> float:
        """Training FLOPs of one step (forward + backward, train/flops.py)."""
        job = self.job
        per_token = model_flops_per_token(job.model, job.attention, job.moe, job.data.seq_len)
        return per_token * job.trainer.global_batch_size * job.data.seq_len

    def step_time_s(self) -> float:
        """Median seconds per step over the logged intervals (tokens per step / tokens per second)."""
        rates = list(self.series.get("tokens_per_s", {}).values())[1:]  # the first interval holds the warm-up
        tokens = self.job.trainer.global_batch_size * self.job.data.seq_len
        return tokens / statistics.median(rates)


def start(doc: str, experiment: str, steps_help: str) -> tuple[argparse.Namespace, Path]:
    """Parse a script's --steps and --fresh; returns them and the folder of its runs at that many
    steps (emptied with --fresh). Runs this process on one thread, as the trainings are."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help=steps_help)
    parser.add_argument("--fresh", action="store_true", help="delete this script's finished runs first")
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = ROOT / experiment / str(args.steps)
    if args.fresh:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    return args, folder


def cli(args: list[str], log: Path) -> float:
    """Run `sparsetron ARGS` on one thread, its output into `log`; returns its wall time in seconds."""
    start = time.perf_counter()
    with log.open("a") as out:
        done = subprocess.run(
            [sys.executable, "-m", "sparsetron.launch.cli", *args],
            env={**os.environ, **ONE_THREAD},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    if done.returncode != 0:
        raise SystemExit(f"`sparsetron {' '.join(args)}` failed with status {done.returncode}; see {log}")
    return time.perf_counter() - start


def train(folder: Path, name: str, sets: list[str], resume: str | None = None, before: float = 0.0) -> Run:
    """`sparsetron train tiny` with `sets` into `folder` (skipped when it finished before). `before`
    adds the wall time of what made the resumed checkpoint (an upcycle command)."""
    if not (folder / MARKER).is_file():
        shutil.rmtree(folder, ignore_errors=True)  # an interrupted attempt
        folder.mkdir(parents=True)
        args = ["train", "tiny", "--set", f"trainer.run_dir={folder}", *(a for s in sets for a in ("--set", s))]
        print(f"  training {name}: sparsetron {' '.join(args)}" + (f" --resume {resume}" if resume else ""), flush=True)
        wall = before + cli([*args, *(["--resume", resume] if resume else [])], folder.parent / f"{folder.name}.log")
        (folder / MARKER).write_text(json.dumps({"name": name, "sets": sets, "resume": resume, "wall_s": wall}) + "\n")
    wall = json.loads((folder / MARKER).read_text())["wall_s"]
    job = from_dict(JobConfig, yaml.safe_load((folder / "config.yaml").read_text()), "")
    return Run(name, folder, job, wall)


def plot_curves(path: Path, title: str, panels: list[tuple[str, list[tuple[str, dict, dict]]]]) -> Path:
    """One PNG of side-by-side panels (x label, [(label, {x: train loss}, {x: eval loss})]): eval
    loss solid with markers, train loss thin and faint in the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 6.4 if len(panels) == 1 else 5.0
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 3.6), squeeze=False, layout="constrained")
    for ax, (xlabel, curves) in zip(axes[0], panels, strict=True):
        for index, (label, train_loss, eval_loss) in enumerate(curves):
            colour = f"C{index}"
            if train_loss:
                ax.plot(list(train_loss), list(train_loss.values()), color=colour, alpha=0.35, linewidth=0.9)
            ax.plot(list(eval_loss), list(eval_loss.values()), color=colour, marker="o", label=f"{label} (eval)")
        # The first steps' losses (5-6) would flatten the differences that matter.
        lowest = min(min(eval_loss.values()) for _, _, eval_loss in curves)
        ax.set_ylim(top=min(ax.get_ylim()[1], lowest + 1.4))
        ax.set(xlabel=xlabel, ylabel="loss", title=f"loss against {xlabel} (train faint, eval marked)")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)
    return path
