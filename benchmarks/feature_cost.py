"""What each opt-in model feature of issue 16 costs in step time, side by side on one recipe.

Builds one Trainer per variant (the recipe, `tiny` by default, plus the variant's overrides, run
folders under a temporary folder) and times their training steps interleaved: each round runs one
untimed and one timed step of every variant in turn, so that load from other processes falls on
all of them alike. Prints each variant's median step time and its ratio to the recipe as shipped
(above 1: the feature costs that factor).

    python benchmarks/feature_cost.py                        # tiny on the CPU, fp32, 10 rounds (an MoE recipe)
    python benchmarks/feature_cost.py --rounds 20 --threads 1 --clock process   # on a shared CPU
    python benchmarks/feature_cost.py --recipe tiny --set trainer.device=cuda --output $OUT/feature_cost.md
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from report import cpu_interleaved_ms, emit

from sparsetron.train.config_io import load_job_config
from sparsetron.train.trainer import Trainer

# name: overrides on top of the recipe
VARIANTS: dict[str, list[str]] = {
    "recipe": [],
    "mtp_depth=1": ["model.mtp_depth=1"],
    "mtp_depth=2": ["model.mtp_depth=2"],
    "router_input=pre_attention": ["moe.router_input=pre_attention"],
    "sigma_reparam": ["model.sigma_reparam=true"],
    "attention_entropy every step": ["metrics.attention_entropy_interval=1"],
}
QUIET = ["metrics.console=none", "metrics.tensorboard=false", "checkpoint.interval=0", "checkpoint.save_final=false"]


def trainers(recipe: str, extra: list[str], variants: list[str], root: str) -> dict[str, Trainer]:
    built = {}
    for name in variants:
        run_dir = f"{root}/{name.replace('=', '-')}"
        job = load_job_config(recipe, [*QUIET, f"trainer.run_dir={run_dir}", *extra, *VARIANTS[name]])
        built[name] = Trainer(job)
    return built


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="tiny")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=10, help="timed steps of each variant")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--clock", choices=["wall", "process"], default="wall", help="process: this process's CPU time (shared CPUs)"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    parser.add_argument("--output", help="also write the table to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "process" else time.perf_counter
    with tempfile.TemporaryDirectory(prefix="feature-cost-") as root:
        built = trainers(args.recipe, args.set, args.variants, root)
        try:
            steps = {name: trainer.train_step for name, trainer in built.items()}
            times = cpu_interleaved_ms(steps, args.rounds, settle=1, clock=clock)
        finally:
            for trainer in built.values():
                trainer.close()
    base = statistics.median(times[args.variants[0]])
    lines = [
        f"Step time of `{args.recipe}` {' '.join(args.set)} with each feature, {args.rounds} interleaved rounds, "
        f"{args.clock} clock, {torch.get_num_threads()} threads",
        "",
        "| variant | median step ms | ratio to " + args.variants[0] + " |",
        "|---|---|---|",
    ]
    for name, samples in times.items():
        median = statistics.median(samples)
        lines.append(f"| {name} | {median:.1f} | {median / base:.2f} |")
    return emit("\n".join(lines), args.output)


if __name__ == "__main__":
    main()
