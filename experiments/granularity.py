"""Granularity (Krajewski et al. 2024, "Scaling Laws for Fine-Grained Mixture of Experts") at small
scale: at equal active parameters and equal tokens, MoE with G = 1, 4 and 8 against the dense model.

    python experiments/granularity.py              # 4 runs of `tiny`'s 300 steps, one at a time
    python experiments/granularity.py --steps 60   # a quick look
    python experiments/granularity.py --fresh      # train again what an earlier call finished

Every run is `sparsetron train tiny` on `tiny`'s data (Python's standard library), steps and batch,
on one thread. The MoE runs have E = 4 x G routed experts of hidden ffn_hidden / G, top_k x G = G
per token and no shared expert, so the routed FFN a token passes through has exactly the dense
FFN's width (its active parameters differ only by the router); tiny's first dense layer and
balancing losses are kept. Dense is `moe.num_experts=0`. Prints a table (parameters, final eval
loss, step time, FLOPs) and draws docs/plots/granularity.png. Run folders go under
/tmp/sparsetron-experiments/granularity/STEPS.
"""

from __future__ import annotations

from pathlib import Path

from runs import plot_curves, start, train

GRANULARITIES = (1, 4, 8)
PLOT = Path(__file__).resolve().parent.parent / "docs" / "plots" / "granularity.png"


def main() -> None:
    args, root = start(__doc__, "granularity", "training steps of every run (tiny: 300)")
    common = [f"trainer.steps={args.steps}", f"trainer.eval_interval={max(args.steps // 6, 1)}"]
    runs = [train(root / "dense", "dense", [*common, "moe.num_experts=0"])]
    for G in GRANULARITIES:
        moe = ["moe.num_experts=4", "moe.top_k=1", f"moe.granularity={G}", "moe.n_shared_experts=0"]
        runs.append(train(root / f"moe-g{G}", f"MoE G={G}", [*common, *moe]))

    print(f"\ngranularity at {args.steps} steps of {runs[0].job.trainer.global_batch_size} x 256 tokens (tiny)")
    print("| model | experts (routed, per token) | total params | active params | eval loss | step time | FLOPs |")
    print("|---|---|---|---|---|---|---|")
    for run in runs:
        total, active = run.params()
        moe = run.job.moe
        experts = f"{moe.routed_experts}, {moe.experts_per_token}" if moe.enabled else "-"
        flops = run.flops_per_step() * args.steps
        print(
            f"| {run.name} | {experts} | {total / 1e6:.3f}M | {active / 1e6:.4f}M | {run.final_eval():.4f} | "
            f"{run.step_time_s():.2f} s | {flops:.3g} |"
        )
    curves = [(run.name, run.series.get("loss", {}), run.eval_losses()) for run in runs]
    print(f"wrote {plot_curves(PLOT, f'granularity, {args.steps} steps', [('step', curves)])}")


if __name__ == "__main__":
    main()
