"""Expert pruning on `tiny`: eval loss against the routed experts kept per MoE layer.

    OMP_NUM_THREADS=1 sparsetron train tiny --set trainer.run_dir=/tmp/prune-base    # ~4-5 min on a CPU
    OMP_NUM_THREADS=1 python experiments/expert_pruning.py --base /tmp/prune-base --work /tmp/prune-exp

The claim (the expert-pruning and faster-MoE-inference papers): a trained MoE keeps most of its
quality when its least used experts are dropped, a little more when they are merged into the
kept ones, and when each token is routed to fewer experts. `tiny` has 16 routed experts per MoE
layer (3 layers), 4 per token, and one shared expert. For E' in {16, 12, 8, 4} kept experts
this runs `sparsetron prune --keep E'` (plain, with --merge, and with --top-k 2), then `sparsetron
eval` on each result (in this process, the same functions), prints a table and draws
docs/plots/expert_pruning.png. The usage is measured on the first trainer.eval_batches
micro-batches of the validation split, the batches eval reports on (see the report for why that
selects little). The base is trained first when --base holds no checkpoint.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

from sparsetron.model.params import active_params, num_params
from sparsetron.model.transformer import Transformer
from sparsetron.train.checkpoint import list_complete
from sparsetron.train.evaluate import RUN_CHECKPOINTS, evaluate_checkpoint, open_checkpoint
from sparsetron.train.plot import DPI
from sparsetron.train.prune import prune_checkpoint

KEEP = (16, 12, 8, 4)
VARIANTS = {"drop": {}, "merge": {"merge": True}, "top-k 2": {"top_k": 2}}
PLOT = Path(__file__).resolve().parent.parent / "docs" / "plots" / "expert_pruning.png"


def ensure_base(base: Path) -> None:
    """Train `tiny` into `base` unless it already holds a complete checkpoint."""
    if list_complete(base / RUN_CHECKPOINTS):
        return
    command = [sys.executable, "-m", "sparsetron.launch.cli", "train", "tiny", "--set", f"trainer.run_dir={base}"]
    print("training the base:", " ".join(command), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


def parameters(checkpoint: Path) -> tuple[int, int]:
    """Total and active (per token) parameters of the model a checkpoint's config describes."""
    _, _, job = open_checkpoint(checkpoint)
    with torch.device("meta"):
        model = Transformer(job.model, job.attention, job.moe)
    return num_params(model), active_params(job.model, job.attention, job.moe)


def run(base: Path, work: Path) -> tuple[float, dict[str, dict[int, float]], dict[str, dict[int, tuple[int, int]]]]:
    """The base's eval loss, and each variant's eval loss and parameters (total, active) by experts kept."""
    base_loss = evaluate_checkpoint(base).loss
    losses: dict[str, dict[int, float]] = {name: {} for name in VARIANTS}
    params: dict[str, dict[int, tuple[int, int]]] = {name: {} for name in VARIANTS}
    for name, options in VARIANTS.items():
        for keep in KEEP:
            if name == "merge" and keep == KEEP[0]:
                losses[name][keep] = losses["drop"][keep]  # nothing pruned, nothing to merge
                params[name][keep] = params["drop"][keep]
                continue
            out = work / f"{name.replace(' ', '')}-e{keep}"
            if not list_complete(out):
                prune_checkpoint(base, out, keep, **options)
            losses[name][keep] = evaluate_checkpoint(out).loss
            params[name][keep] = parameters(out)
            print(f"{name:8s} E'={keep:2d}: eval loss {losses[name][keep]:.4f}", flush=True)
    return base_loss, losses, params


def table(base_loss: float, losses: dict[str, dict[int, float]], params: dict[str, dict[int, tuple[int, int]]]) -> str:
    """Eval loss (its change from the base) per variant and experts kept, with total / active parameters."""
    head = "| routed experts kept | parameters (total / active) | " + " | ".join(VARIANTS) + " |"
    rows = [head, "|" + "---|" * (len(VARIANTS) + 2)]
    for keep in KEEP:
        total, active = params["drop"][keep]
        sizes = f"{total / 1e6:.2f}M / {active / 1e6:.2f}M"
        cells = [f"{losses[name][keep]:.4f} ({losses[name][keep] - base_loss:+.4f})" for name in VARIANTS]
        rows.append(f"| {keep} | {sizes} | " + " | ".join(cells) + " |")
    top2 = params["top-k 2"][KEEP[0]][1]
    return "\n".join(rows) + (
        f"\n\nbase `tiny` (16 experts, 4 per token): eval loss {base_loss:.4f}; "
        f"with 2 experts per token {top2 / 1e6:.2f}M active parameters"
    )


def plot(base_loss: float, losses: dict[str, dict[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), layout="constrained")
    labels = {
        "drop": "drop the least used (4 per token)",
        "merge": "merge them into the kept (4 per token)",
        "top-k 2": "drop, and 2 experts per token",
    }
    for name, by_keep in losses.items():
        ax.plot(list(by_keep), list(by_keep.values()), marker="o", label=labels[name])
    ax.axhline(base_loss, color="gray", linestyle="--", linewidth=1, label="trained tiny (16 experts)")
    ax.set_xlabel("routed experts kept per MoE layer (of 16)")
    ax.set_ylabel("eval loss")
    ax.set_xticks(list(KEEP))
    ax.invert_xaxis()
    ax.set_title("tiny: eval loss after expert pruning (no fine-tuning)")
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=Path("/tmp/prune-base"), help="the trained tiny run folder")
    parser.add_argument("--work", type=Path, default=Path("/tmp/prune-exp"), help="folder for the pruned checkpoints")
    parser.add_argument("--plot", type=Path, default=PLOT, help="PNG to write")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ensure_base(args.base)
    base_loss, losses, params = run(args.base, args.work)
    print(table(base_loss, losses, params))
    plot(base_loss, losses, args.plot)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
