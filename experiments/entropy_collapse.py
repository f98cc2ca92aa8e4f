"""Attention-entropy collapse and its cure by sigmaReparam (Zhai et al. 2023, "Stabilizing
Transformer Training by Preventing Attention Entropy Collapse"), at `tiny` scale on one CPU thread.

    PYTHONPATH=<folder holding a link sparsetron -> the checkout> OMP_NUM_THREADS=1 \\
        python experiments/entropy_collapse.py [--lr 0.1] [--steps 120] [--out docs/plots/entropy_collapse.png]

Trains `tiny` twice at a learning rate 33 times its own (3e-3), short runs (rows of 128 tokens,
8 per step, 5 warm-up steps): once plain, once with model.sigma_reparam. Each run logs every
layer's mean attention entropy (metrics.attention_entropy_interval) and its loss every 5 steps.
Prints a table (final and lowest loss, the largest loss after the first 10 steps, each layer's
final entropy, seconds per step) and draws the loss and the mean entropy over layers of both
runs into one PNG. Each run takes one to three minutes on a shared CPU. The runs go under
/tmp/entropy_collapse (replaced on each launch).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
from pathlib import Path

import torch

from sparsetron.train.config_io import load_job_config
from sparsetron.train.metrics import JSONL_FILE
from sparsetron.train.plot import DPI, read_series
from sparsetron.train.trainer import Trainer

RUNS = Path("/tmp/entropy_collapse")
INTERVAL = 5
SHORT = [
    "trainer.micro_batch_size=8",
    "data.seq_len=128",
    "schedule.warmup_steps=5",
    f"metrics.log_interval={INTERVAL}",
    f"metrics.attention_entropy_interval={INTERVAL}",
    "metrics.console=plain",
    "trainer.eval_interval=0",
    "checkpoint.interval=0",
    "checkpoint.save_final=false",
    # A diverging run keeps going: the point is to watch it.
    "trainer.max_nonfinite_steps=1000000",
]


def train(name: str, lr: float, steps: int, reparam: bool) -> dict:
    """One run; its curves: loss and per-layer entropy by step, and seconds per step."""
    run_dir = RUNS / name
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [
        *SHORT,
        f"optimizer.lr={lr}",
        f"trainer.steps={steps}",
        f"model.sigma_reparam={str(reparam).lower()}",
        f"trainer.run_dir={run_dir}",
    ]
    job = load_job_config("tiny", overrides)
    Trainer(job).run()
    series = read_series(run_dir / JSONL_FILE)
    layers = sorted(key for key in series if key.startswith("attention/") and key.endswith("/entropy"))
    tokens = job.trainer.micro_batch_size * job.trainer.grad_accum_steps * job.data.seq_len
    return {
        "loss": series["loss"],
        "entropy": {key.split("/")[1]: series[key] for key in layers},
        "s_per_step": statistics.median(tokens / rate for rate in series["tokens_per_s"].values()),
    }


def mean_entropy(run: dict) -> dict[int, float]:
    layers = list(run["entropy"].values())
    return {step: sum(layer[step] for layer in layers) / len(layers) for step in layers[0]}


def table(runs: dict[str, dict]) -> str:
    names = list(next(iter(runs.values()))["entropy"])
    header = ["run", "final loss", "min loss", "max loss after 10", *(f"entropy {n}" for n in names), "s/step"]
    rows = [header]
    for label, run in runs.items():
        loss = run["loss"]
        last = max(loss)
        late = [v for s, v in loss.items() if s > 10]
        entropy = [f"{layer[max(layer)]:.3f}" for layer in run["entropy"].values()]
        rows.append(
            [label, f"{loss[last]:.3f}", f"{min(loss.values()):.3f}", f"{max(late):.3f}", *entropy]
            + [f"{run['s_per_step']:.3f}"]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)


def draw(runs: dict[str, dict], lr: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, entropy_ax) = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    for label, run in runs.items():
        steps = sorted(run["loss"])
        loss_ax.plot(steps, [run["loss"][s] for s in steps], label=label)
        entropy = mean_entropy(run)
        steps = sorted(entropy)
        entropy_ax.plot(steps, [entropy[s] for s in steps], label=label)
    loss_ax.set(xlabel="step", ylabel="training loss", title=f"tiny at lr {lr:g}: loss")
    entropy_ax.set(xlabel="step", ylabel="nats", title="mean attention entropy over layers")
    for ax in (loss_ax, entropy_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--out", type=Path, default=Path("docs/plots/entropy_collapse.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = {
        "plain": train("plain", args.lr, args.steps, reparam=False),
        "sigma_reparam": train("sigma_reparam", args.lr, args.steps, reparam=True),
    }
    print(table(runs))
    for label, run in runs.items():
        entropy = mean_entropy(run)
        print(f"{label} mean entropy by step: " + " ".join(f"{s}:{entropy[s]:.2f}" for s in sorted(entropy)))
        print(f"{label} loss by step: " + " ".join(f"{s}:{run['loss'][s]:.2f}" for s in sorted(run["loss"])))
    draw(runs, args.lr, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
