"""The pre-attention router's quality cost (SmallThinker): `tiny` trained with each router input.

    PYTHONPATH=. OMP_NUM_THREADS=1 python experiments/pre_attention_router.py --runs /tmp/pre_attention_router

(from a folder where `sparsetron` imports; a finished 300-step run in --runs is kept, not trained
again; `--plot-only` redraws from finished runs.)

SmallThinker routes each MoE layer on the block's input before attention
(moe.router_input=pre_attention), so an inference engine knows which experts a token needs while
attention still runs and can fetch their weights meanwhile. The claim to check is that this costs
little quality. This script trains the `tiny` recipe for its 300 steps twice, one run at a time on
one thread, with the usual FFN-input router and with the pre-attention one (same seed, data and
schedule), prints each run's eval loss at the recipe's eval steps and its CPU step time, and
draws both loss curves into docs/plots/pre_attention_router.png.

A run's step time is the median over its logged windows (evaluation and checkpoints excluded; the
first window, which holds the warm-up, left out) of tokens per step / tokens per second: a median,
because the CPU may be shared with other work. The two 300-step runs follow each other, so a busy
spell may fall on one only; what compares the routers' cost is `time_steps`: both models in this
process, the same step's forward and backward timed alternately (--timing-rounds each), the fastest.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from sparsetron.model.transformer import materialised_transformer
from sparsetron.train.config_io import load_job_config
from sparsetron.train.metrics import JSONL_FILE
from sparsetron.train.plot import DPI, read_series
from sparsetron.train.trainer import STATUS_FILE

ROUTERS = ("ffn_input", "pre_attention")
PLOT = Path(__file__).resolve().parent.parent / "docs" / "plots" / "pre_attention_router.png"


def train(run_dir: Path, router_input: str, *overrides: str) -> None:
    """`sparsetron train tiny` with moe.router_input=`router_input` into `run_dir`, on one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    settings = [f"trainer.run_dir={run_dir}", f"moe.router_input={router_input}", *overrides]
    command = [sys.executable, "-m", "sparsetron.launch.cli", "train", "tiny"]
    for setting in settings:
        command += ["--set", setting]
    subprocess.run(command, env=env, check=True)


def finished(run_dir: Path) -> bool:
    """Whether `run_dir` holds a run that trained to its last step (kept, not trained again)."""
    status = run_dir / STATUS_FILE
    return status.is_file() and json.loads(status.read_text())["finished"]


def step_seconds(run_dir: Path) -> float:
    """The run's median step time (see the module docstring)."""
    series = read_series(run_dir / JSONL_FILE)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    trainer = config["trainer"]
    tokens_per_step = trainer["micro_batch_size"] * trainer["grad_accum_steps"] * config["data"]["seq_len"]
    return statistics.median(tokens_per_step / rate for rate in list(series["tokens_per_s"].values())[1:])


def time_steps(rounds: int) -> dict[str, float]:
    """Fastest forward + backward of one `tiny` step (micro_batch_size x seq_len tokens) per router,
    in this process on one thread, the routers alternating `rounds` times with the same weights and
    batch (each row one sequence): the fastest of many alternating tries is what a shared CPU's busy spells disturb least.
    The optimizer step, the same for both, is left out."""
    torch.set_num_threads(1)
    job = load_job_config("tiny", ["model.vocab_size=4096"])
    tokens_BS = torch.randint(0, 4096, (job.trainer.micro_batch_size, job.data.seq_len + 1))
    models = {}
    for name in ROUTERS:
        torch.manual_seed(0)
        models[name] = materialised_transformer(job.model, job.attention, replace(job.moe, router_input=name))
    times: dict[str, list[float]] = {name: [] for name in ROUTERS}
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            logits = model(tokens_BS[:, :-1])
            F.cross_entropy(logits.flatten(0, 1), tokens_BS[:, 1:].flatten()).backward()
            times[name].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    return {name: min(values) for name, values in times.items()}


def summary(run_dir: Path) -> dict:
    """Eval losses by step, training losses by step, and the median step time in seconds."""
    series = read_series(run_dir / JSONL_FILE)
    return {"eval": series["eval/loss"], "train": series["loss"], "step_s": step_seconds(run_dir)}


def table(results: dict[str, dict], timed: dict[str, float]) -> str:
    """Markdown: eval loss at each eval step, the 300-step run's step time, the alternating timing's."""
    base = ROUTERS[0]
    steps = list(results[base]["eval"])
    lines = [
        "| router input | "
        + " | ".join(f"eval loss @ {s}" for s in steps)
        + " | step time, 300-step run | forward + backward, fastest alternating |",
        "|---" * (len(steps) + 3) + "|",
    ]
    for name, result in results.items():
        losses = " | ".join(f"{result['eval'][s]:.4f}" for s in steps)
        cells = []
        for value, reference in ((result["step_s"], results[base]["step_s"]), (timed[name], timed[base])):
            cost = f" ({value / reference - 1:+.1%})" if name != base else ""
            cells.append(f"{value * 1000:.0f} ms{cost}")
        lines.append(f"| {name} | {losses} | {' | '.join(cells)} |")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), layout="constrained")
    for (name, result), color in zip(results.items(), ("C0", "C1"), strict=True):
        train_loss, eval_loss = result["train"], result["eval"]
        ax.plot(list(train_loss), list(train_loss.values()), color=color, alpha=0.6, label=f"{name}: train")
        ax.plot(list(eval_loss), list(eval_loss.values()), color=color, marker="o", label=f"{name}: eval")
    ax.set(xlabel="step", ylabel="loss", title="tiny: router on the FFN input vs before attention")
    ax.set_ylim(top=min(ax.get_ylim()[1], 6.0))
    ax.legend()
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", type=Path, default=Path("/tmp/pre_attention_router"), help="one run folder per router"
    )
    parser.add_argument("--plot", type=Path, default=PLOT, help="where to draw the loss curves")
    parser.add_argument("--plot-only", action="store_true", help="read finished runs instead of training")
    parser.add_argument("--timing-rounds", type=int, default=20, help="alternating timed steps per router")
    args = parser.parse_args(argv)
    if not args.plot_only:
        for router_input in ROUTERS:
            if not finished(args.runs / router_input):
                train(args.runs / router_input, router_input)
    timed = time_steps(args.timing_rounds)
    results = {name: summary(args.runs / name) for name in ROUTERS}
    print(table(results, timed))
    plot(results, args.plot)
    print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
