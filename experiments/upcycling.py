"""Upcycling (Komatsuzaki et al. 2022; He et al. 2024; "Scaling Laws for Upcycling Mixture-of-Experts
Language Models") at small scale: a dense `tiny` upcycled half-way through its schedule and continued
as an MoE, against an MoE trained from scratch.

    python experiments/upcycling.py              # 5 runs, 900 steps of `tiny` in all, one at a time
    python experiments/upcycling.py --steps 60   # a quick look
    python experiments/upcycling.py --fresh      # train again what an earlier call finished

Runs (every MoE run is `tiny` with moe.route_order=topk_then_softmax; N = --steps):
- dense: `tiny` with moe.num_experts=0 for steps 0..N/2 of an N-step schedule (trainer.stop_at);
- upcycled: `sparsetron upcycle --continue` of the dense step-N/2 checkpoint (virtual-group router:
  identical router rows per copy, so the MoE computes the dense function), then `sparsetron train
  --resume` to step N: the learning-rate schedule continues and the data reads on where the dense
  run stopped (the optimizer is fresh);
- restarted: the same upcycled MoE trained as the earlier README experiment did, without --continue:
  its own N/2-step schedule (warm-up again) and the data from its start, which the dense run read;
- scratch N: the MoE from scratch for N steps (the same steps and tokens as dense + upcycled:
  the equal total budget, though a dense step costs fewer FLOPs);
- scratch N/2: the MoE from scratch for N/2 steps with its own schedule (as many MoE steps as the
  upcycled run took: the dense run's cost sunk).

Prints a table (final eval loss, steps, FLOPs, wall time) and draws docs/plots/upcycling.png (loss
against step, against MoE steps taken, and against training FLOPs). Run folders go under
/tmp/sparsetron-experiments/upcycling/N.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from runs import MARKER, Run, cli, plot_curves, start, train

PLOT = Path(__file__).resolve().parent.parent / "docs" / "plots" / "upcycling.png"
MOE = ["moe.route_order=topk_then_softmax"]


def main() -> None:
    args, root = start(__doc__, "upcycling", "steps of the full schedule N (tiny: 300; even)")
    N, half = args.steps, args.steps // 2
    common = [f"trainer.eval_interval={max(N // 6, 1)}", f"checkpoint.interval={half}"]

    dense = train(
        root / "dense", "dense", [*common, f"trainer.steps={N}", f"trainer.stop_at={half}", "moe.num_experts=0"]
    )
    moe_sets = [*common, f"trainer.steps={N}", *MOE]
    dense_checkpoints = dense.folder / "checkpoints"
    upcycled = _upcycled(root / "upcycled", dense_checkpoints, moe_sets, continue_run=True)
    restarted_sets = [*common, f"trainer.steps={half}", *MOE]
    restarted = _upcycled(root / "restarted", dense_checkpoints, restarted_sets, continue_run=False)
    scratch = train(root / "scratch-full", f"scratch MoE {N}", moe_sets)
    short = train(root / "scratch-half", f"scratch MoE {half}", [*common, f"trainer.steps={half}", *MOE])

    dense_flops, moe_flops = dense.flops_per_step(), scratch.flops_per_step()
    rows = [
        ("dense (stopped)", dense, f"{half} dense", half * dense_flops),
        ("dense -> upcycled MoE", upcycled, f"{half} dense + {half} MoE", half * (dense_flops + moe_flops)),
        ("dense -> upcycled, restarted", restarted, f"{half} dense + {half} MoE", half * (dense_flops + moe_flops)),
        (scratch.name, scratch, f"{N} MoE", N * moe_flops),
        (short.name, short, f"{half} MoE", half * moe_flops),
    ]
    tokens = dense.job.trainer.global_batch_size * dense.job.data.seq_len
    print(f"\nupcycling at N = {N} steps of {tokens} tokens; dense upcycled at step {half}")
    print(f"training FLOPs per step: dense {dense_flops:.3g}, MoE {moe_flops:.3g} ({moe_flops / dense_flops:.2f}x)")
    print("| run | steps | final eval loss | training FLOPs | wall time |")
    print("|---|---|---|---|---|")
    for label, run, steps, flops in rows:
        print(f"| {label} | {steps} | {run.final_eval():.4f} | {flops:.3g} | {run.wall_s / 60:.1f} min |")

    # The upcycled MoE computes the dense function at step N/2 (tests/unit/test_upcycle_continue.py),
    # so its curve starts from the dense run's last values; the restarted one counts its steps from 0.
    joined = [{**d, **u} for d, u in zip(_curves(dense), _curves(upcycled), strict=True)]
    shifted = [{half + s: v for s, v in c.items()} for c in _curves(restarted)]
    upcycles = [("dense -> upcycled", *joined), ("dense -> upcycled, restarted", *shifted)]
    by_step = [*upcycles, *((run.name, *_curves(run)) for run in (scratch, short))]
    by_moe_step = [(name, *({s - half: v for s, v in c.items() if s >= half} for c in cs)) for name, *cs in upcycles]
    by_moe_step += by_step[2:]
    spent = [dense_flops * min(s, half) + moe_flops * max(s - half, 0) for s in range(N + 1)]
    by_flops = [(name, *({spent[s]: v for s, v in c.items()} for c in cs)) for name, *cs in upcycles]
    by_flops += [(name, *({moe_flops * s: v for s, v in c.items()} for c in cs)) for name, *cs in by_step[2:]]
    panels = [("step", by_step), ("MoE steps taken", by_moe_step), ("training FLOPs", by_flops)]
    print(f"wrote {plot_curves(PLOT, f'upcycling, {N} steps', panels)}")


def _upcycled(folder: Path, dense_checkpoints: Path, sets: list[str], continue_run: bool) -> Run:
    """`sparsetron upcycle` of the dense run's checkpoint into `tiny` with `sets` (into `folder`-init),
    then `sparsetron train --resume` it into `folder`."""
    init = folder.parent / f"{folder.name}-init"
    upcycle_s = 0.0
    if not (folder / MARKER).is_file():
        shutil.rmtree(init, ignore_errors=True)
        command = ["upcycle", "--from", str(dense_checkpoints), "--recipe", "tiny", "--out", str(init)]
        command += [*(["--continue"] if continue_run else []), *(a for s in sets for a in ("--set", s))]
        print(f"  upcycling: sparsetron {' '.join(command)}", flush=True)
        upcycle_s = cli(command, folder.parent / f"{folder.name}-upcycle.log")
    return train(folder, folder.name, sets, resume=str(init), before=upcycle_s)


def _curves(run: Run) -> tuple[dict, dict]:
    """(train loss, eval loss) by step."""
    return run.series.get("loss", {}), run.eval_losses()


if __name__ == "__main__":
    main()
