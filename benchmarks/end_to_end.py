"""End to end on one GPU: sparsetron's trainer beside the plain-PyTorch anchor of ../shared/specs/anchors.md.

For each model (recipes bench-1b-dense and bench-1b-moe), two fresh processes, one after the
other: `sparsetron train RECIPE` and `benchmarks/anchor_llama.py` with the recipe's own shapes.
Each runs --warmup untimed steps (compilation, allocator warm-up) then --steps timed ones. The
trainer logs every --warmup steps, so its last logged window in metrics.jsonl covers exactly the
timed steps. Both sides count MFU by the anchors' formula (sparsetron.train.flops) over the same
active parameters, which are checked equal before any ratio is printed. Peak memory is the
caching allocator's peak allocated bytes over the whole run. A run that fails, runs out of memory
or outlives its share of --budget is reported in its cell, and the next one still runs.

    python benchmarks/end_to_end.py                            # GPU: dense and MoE, ~1B each
    python benchmarks/end_to_end.py --models moe --warmup 10 --steps 10 --output $OUT/end_to_end.md
    python benchmarks/end_to_end.py --models dense --set model.n_layers=8   # recipe overrides; the anchor follows the shapes
    python benchmarks/end_to_end.py --device cpu               # tiny dims, fp32, eager: a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import emit

from sparsetron.model.params import active_params
from sparsetron.train.config_io import load_job_config

RECIPES = {"dense": "bench-1b-dense", "moe": "bench-1b-moe"}
# Tiny shapes for the CPU smoke run: the plumbing, not the speed.
CPU_OVERRIDES = [
    "model.dim=64",
    "model.n_layers=2",
    "model.ffn_hidden=128",
    "model.vocab_size=320",
    "attention.n_heads=4",
    "attention.n_kv_heads=4",
    "data.seq_len=64",
    "data.max_documents=40",
    "trainer.device=cpu",
    "trainer.precision=fp32",
    "parallel.compile=false",
]
CPU_MOE_OVERRIDES = ["moe.num_experts=8", "moe.top_k=2", "moe.expert_hidden=32", "moe.expert_backend=loop"]
ANCHOR = Path(__file__).with_name("anchor_llama.py")
# Seconds kept back for each run still to come (an estimate of one 1B run: start, compile, 20 steps).
RESERVE_S = 45.0


def job_for(args, model: str, run_dir: str):
    overrides = list(CPU_OVERRIDES) if args.device == "cpu" else []
    if args.device == "cpu" and model == "moe":
        overrides += CPU_MOE_OVERRIDES
    overrides += list(args.set)
    overrides += [
        f"trainer.steps={args.warmup + args.steps}",
        f"metrics.log_interval={args.warmup}",
        f"trainer.run_dir={run_dir}",
        f"schedule.warmup_steps={min(args.warmup, 5)}",
    ]
    return overrides, load_job_config(RECIPES[model], overrides)


def anchor_argv(args, job) -> list[str]:
    m, a, e = job.model, job.attention, job.moe
    if (
        a.kv_heads() != a.n_heads
        or a.qk_norm
        or a.qkv_bias
        or m.tie_embeddings
        or e.n_shared_experts
        or e.first_k_dense
    ):
        raise SystemExit(f"{RECIPES}: the anchor models plain multi-head Llama blocks only")
    argv = ["--device", args.device, "--dim", str(m.dim), "--layers", str(m.n_layers), "--heads", str(a.n_heads)]
    argv += ["--ffn", str(m.ffn_hidden), "--vocab", str(m.vocab_size), "--seq", str(job.data.seq_len)]
    argv += ["--batch", str(job.trainer.micro_batch_size), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    if e.enabled:
        argv += ["--experts", str(e.routed_experts), "--top-k", str(e.experts_per_token)]
        argv += ["--expert-hidden", str(e.hidden_size(m))]
    return argv


def launch(cmd: list[str], timeout: float, log: Path) -> tuple[str | None, str]:
    """Run cmd with its output in log; (None, output) on success, else (what went wrong, output)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=env).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    output = log.read_text()
    if rc == 0:
        return None, output
    if "OutOfMemoryError" in output or "out of memory" in output:
        return "OOM", output
    if rc == "timeout":
        return f"timeout after {timeout:.0f} s", output
    last = next((line for line in reversed(output.splitlines()) if line.strip()), "")
    return f"failed (exit {rc}): {last[-160:]}", output


def sparsetron_result(run_dir: Path, args) -> dict:
    """The timed window of metrics.jsonl: the record at the last step, logged right after step --warmup's."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    logged = [r for r in records if "tokens_per_s" in r]
    steps = [r["step"] for r in logged]
    if steps[-2:] != [args.warmup, args.warmup + args.steps]:
        raise ValueError(
            f"metrics.jsonl logged throughput at steps {steps}; expected ..., {args.warmup}, {args.warmup + args.steps}"
        )
    last = logged[-1]
    memory = last.get("memory/max_allocated_gib")
    return {"tokens_per_s": last["tokens_per_s"], "mfu": last.get("mfu"), "peak_memory_gib": memory}


def run_timeout(left: float, runs_left: int) -> float:
    """This run's share of the seconds left: all but RESERVE_S for each later run, at least an equal
    share. Start-up and compilation times differ a lot between runs; equal shares would time out a
    slow first run while later ones leave time unused."""
    return max(left / runs_left, left - RESERVE_S * (runs_left - 1), 1.0)


def run_model(args, model: str, deadline: float, runs_left: int, work: Path) -> dict:
    """Both sides for one model; each result is a dict of numbers or a string saying what went wrong."""
    run_dir = work / f"sparsetron-{model}"
    overrides, job = job_for(args, model, str(run_dir))
    expected_active = active_params(job.model, job.attention, job.moe)
    sides = {
        "sparsetron": [sys.executable, "-m", "sparsetron.launch.cli", "train", RECIPES[model]]
        + [x for o in overrides for x in ("--set", o)],
        "anchor": [sys.executable, str(ANCHOR), *anchor_argv(args, job)],
    }
    results = {"active_params": expected_active}
    for side, cmd in sides.items():
        timeout = run_timeout(deadline - time.perf_counter(), runs_left)
        runs_left -= 1
        print(f"{model} {side}: up to {timeout:.0f} s: {' '.join(cmd)}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        error, output = launch(cmd, timeout, work / f"{side}-{model}.log")
        results[f"{side}_wall_s"] = time.perf_counter() - start
        if error is None:
            try:
                results[side] = (
                    sparsetron_result(run_dir, args) if side == "sparsetron" else json.loads(output.splitlines()[-1])
                )
            except (OSError, ValueError, IndexError, KeyError) as err:  # ran, but left no numbers to read
                error = f"no result: {type(err).__name__}: {err}"
        if error is not None:
            results[side] = error.replace("|", "/")
            results[f"{side}_tail"] = output.splitlines()[-5:]
        # Each result as it comes: a suite timeout still leaves the runs that finished.
        print(f"{model} {side}: {results[side]}", file=sys.stderr, flush=True)
    anchor = results["anchor"]
    if isinstance(anchor, dict) and anchor["active_params"] != expected_active:
        results["anchor"] = (
            f"shapes differ: anchor counts {anchor['active_params']:,} active params, sparsetron {expected_active:,}"
        )
    return results


def fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "—"


def table(results: dict[str, dict]) -> list[str]:
    """Markdown: each side's numbers and sparsetron / anchor, ratios only where both sides measured."""
    lines = [
        "| model | active params | side | tokens/s | MFU % | peak GiB | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, res in results.items():
        for side in ("sparsetron", "anchor"):
            r = res[side]
            if isinstance(r, dict):
                mfu = None if r["mfu"] is None else 100 * r["mfu"]
                cells = [fmt(r["tokens_per_s"], ",.0f"), fmt(mfu, ".1f"), fmt(r["peak_memory_gib"], ".1f")]
            else:
                cells = [r, "", ""]
            wall = res[f"{side}_wall_s"]
            lines.append(f"| {model} | {res['active_params'] / 1e9:.3f}B | {side} | {' | '.join(cells)} | {wall:.0f} |")
        s, a = res["sparsetron"], res["anchor"]
        if isinstance(s, dict) and isinstance(a, dict):
            cells = [ratio(s[k], a[k]) for k in ("tokens_per_s", "mfu", "peak_memory_gib")]
        else:
            cells = ["not measured"] * 3
        lines.append(f"| {model} | | sparsetron / anchor | {' | '.join(cells)} | |")
    return lines


def parse(argv: list[str]):
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--models", default="dense,moe", help=f"comma-separated, of {', '.join(RECIPES)}")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps, at most --warmup")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="recipe override (the anchor gets the shapes)",
    )
    parser.add_argument("--budget", type=float, default=300.0, help="seconds for all runs, shared out as they start")
    parser.add_argument("--work-dir", help="run folders and logs (default: a temporary folder)")
    parser.add_argument("--output", help="also write the report to this file")
    args = parser.parse_args(argv)
    args.models = args.models.split(",")
    unknown = [m for m in args.models if m not in RECIPES]
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; known: {', '.join(RECIPES)}")
    if not 1 <= args.steps <= args.warmup:
        parser.error(
            f"--steps {args.steps} must be in [1, --warmup {args.warmup}]: the trainer logs every --warmup steps"
        )
    return args


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    t0 = time.perf_counter()
    deadline = t0 + args.budget
    with tempfile.TemporaryDirectory(prefix="end_to_end-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = {}
        for i, model in enumerate(args.models):
            results[model] = run_model(args, model, deadline, 2 * (len(args.models) - i), work)
    lines = [
        f"## End to end, {args.device}: sparsetron vs the plain-PyTorch anchor ({args.warmup} warm-up + {args.steps} timed steps)",
        "",
        f"`{' '.join(['python benchmarks/end_to_end.py', *argv])}`",
        "",
        *table(results),
    ]
    for model, res in results.items():
        for side in ("sparsetron", "anchor"):
            for line in res.get(f"{side}_tail", []):
                lines.append(f"- {model} {side} output: {line[-200:]}")
    lines.append(f"\nRun time {time.perf_counter() - t0:.0f} s.")
    return emit("\n".join(lines), args.output)


if __name__ == "__main__":
    main()
