"""Context parallelism (parallel/context_parallel.py): what each rank keeps, sends and computes, in
both styles (`parallel.context_style`: ulysses, allgather), for MoBA and full attention.

- CPU/gloo (`context_parallel_gloo.py`): one forward + backward of a small model (2 layers, 4/4
  heads x 16, MoBA 256/3 or full attention) on one 8K-token row of packed documents, at cp = 1, 2
  and 4 spawned ranks: per-rank activation memory (the bytes autograd saves, distinct storages;
  what of it is the attention op's), step time, the loss against cp 1's, and the bytes each style
  sends per layer and rank, forward and backward, beside parallel/context_parallel.py's formula:
      ulysses:   (cp - 1) / cp x (2 H + 2 K) B L d b per direction
      allgather: (cp - 1) / cp x 2 K B S d b per direction
  On the CPU attention is the reference ops (dense masks): their memory is not what a GPU kernel
  keeps, which the split columns show.
- On one device (`context_parallel_ops.py`): the attention op each rank's work reduces to (S / cp
  queries in two zigzag chunks against the keys before them, allgather; the whole sequence with
  H / cp heads, ulysses), timed beside the op on the whole sequence, MoBA and varlen flash
  attention; on a GPU at 32K and 128K in bf16.

    python benchmarks/context_parallel.py                        # GPU: the op times (S 32K and 128K, cp 2, 4, 8)
    python benchmarks/context_parallel.py --output $OUT/context_parallel.md
    python benchmarks/context_parallel.py --device cpu           # CPU: gloo at 8K (a few minutes on 2 cores),
                                                                 # then the op times at S 2K through the reference ops
    python benchmarks/context_parallel.py --device cpu --quick   # tiny (S 256, cp 1 and 2): seconds, the unit test's run
    python benchmarks/context_parallel.py --device cpu --quick --parts ops   # the GPU run's code path, tiny

Shape legend: B rows, S positions per row, L = S / cp per rank, H query and K key/value heads, d head
dim, b bytes per element.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from fractions import Fraction

import torch
from context_parallel_gloo import attention_config, run_ranks
from context_parallel_ops import section as op_section
from report import emit

from sparsetron.model.config import ConfigError
from sparsetron.parallel.context_parallel import STYLES, check_cp

# The CPU/gloo run: the model, the row and the degrees (the spec every rank receives).
GLOO = dict(seq=8192, batch=1, dim=64, layers=2, heads=4, kv_heads=4, vocab=256, block=256, topk=3, mean_doc=2048)
GLOO |= dict(cps=[1, 2, 4], reps=2, seed=0, styles=list(STYLES), attentions=["moba", "full"])
GLOO_QUICK = GLOO | dict(seq=256, dim=32, block=16, mean_doc=64, cps=[1, 2], reps=1)
# The single-device op times.
OPS_GPU = {"seqs": "32768,131072", "op_cps": "2,4,8", "heads": 16, "kv_heads": 16, "head_dim": 128, "moba": "512/3"}
OPS_CPU = {"seqs": "2048", "op_cps": "2,4", "heads": 4, "kv_heads": 4, "head_dim": 32, "moba": "128/3"}
OPS_QUICK = OPS_CPU | {"seqs": "256", "moba": "32/3"}


def formula_bytes(style: str, cp: int, spec: dict, bytes_per_element: int) -> Fraction:
    """Bytes per layer, rank and direction by parallel/context_parallel.py's module docstring."""
    B, S, H, K = spec["batch"], spec["seq"], spec["heads"], spec["kv_heads"]
    d = spec["dim"] // H
    if style == "ulysses":
        return Fraction(cp - 1, cp) * (2 * H + 2 * K) * B * (S // cp) * d * bytes_per_element
    return Fraction(cp - 1, cp) * 2 * K * B * S * d * bytes_per_element


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def memory_table(spec: dict, cases: dict) -> list[str]:
    """Per-rank saved bytes and step time against cp 1's, and the loss check."""
    lines = [
        "| attention | style | cp | tokens/rank | saved MiB/rank | in attention op | rest | saved vs cp 1 | "
        "rest vs cp 1 | 1/cp | step ms | step vs cp 1 | loss vs cp 1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (attention, style, cp), ranks in cases.items():
        base = cases[(attention, None, 1)][0]
        saved = max(r["saved"] for r in ranks)
        inside = max(r["saved_attention"] for r in ranks)
        rest = max(r["saved"] - r["saved_attention"] for r in ranks)
        base_rest = base["saved"] - base["saved_attention"]
        # A step ends when its slowest rank does: the median over steps of the slowest rank's time.
        step = statistics.median(max(times) for times in zip(*(r["times_ms"] for r in ranks), strict=True))
        base_step = statistics.median(base["times_ms"])
        # Equal-sized shards: the mean of the ranks' mean losses is the whole row's.
        loss = sum(r["loss"] for r in ranks) / len(ranks)
        cells = [attention, style or "—", cp, ranks[0]["tokens"], mib(saved), mib(inside), mib(rest)]
        cells += [f"{saved / base['saved']:.3f}", f"{rest / base_rest:.3f}", f"{1 / cp:.3f}"]
        cells += [f"{step:.0f}", f"{step / base_step:.2f}", f"{abs(loss - base['loss']) / base['loss']:.1e}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def comm_table(spec: dict, cases: dict) -> tuple[list[str], bool]:
    """Bytes per layer and rank, forward and backward, against the formula; and whether all matched."""
    lines = [
        "| attention | style | cp | collectives per layer (fwd; bwd) | fwd bytes | bwd bytes | formula | matches |",
        "|---|---|---|---|---|---|---|---|",
    ]
    all_match = True
    for (attention, style, cp), ranks in cases.items():
        if cp == 1:
            continue
        n = spec["layers"]
        per_layer = {phase: Fraction(max(r["comm"][phase] for r in ranks), n) for phase in ("forward", "backward")}
        same = all(r["comm"] == ranks[0]["comm"] for r in ranks)
        expected = formula_bytes(style, cp, spec, bytes_per_element=4)  # the gloo model runs in fp32
        match = same and per_layer["forward"] == per_layer["backward"] == expected
        all_match &= match
        calls = "; ".join(
            ", ".join(
                f"{ranks[0]['collectives'][p].count(c) // n} {c}" for c in sorted(set(ranks[0]["collectives"][p]))
            )
            for p in ("forward", "backward")
        )
        cells = [attention, style, cp, calls, per_layer["forward"], per_layer["backward"], expected]
        cells.append("yes" if match else "NO" + ("" if same else " (ranks differ)"))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines, all_match


def gloo_section(args) -> list[str]:
    spec = args.gloo
    start = time.perf_counter()
    results = run_ranks(spec, args.timeout)
    # (attention, style, cp) -> the results of ranks 0 .. cp - 1
    cases = {key: [r[key] for r in results if key in r] for key in results[0]}
    mem, comm = memory_table(spec, cases), comm_table(spec, cases)
    d = spec["dim"] // spec["heads"]
    return [
        f"### CPU/gloo: one row of {spec['seq']} tokens (documents of mean length {spec['mean_doc']}), "
        f"{spec['layers']} layers, heads {spec['heads']}/{spec['kv_heads']} x {d}, MoBA {spec['block']}/{spec['topk']}, "
        f"fp32, cp = {', '.join(map(str, spec['cps']))}, one thread per rank",
        "",
        *mem,
        "",
        "Saved MiB/rank: the distinct storages autograd saves over the forward (weights excluded), largest rank; "
        "'in attention op' is what was first saved inside the (wrapped) attention op, exchange included, its output "
        "not; on the CPU those are the reference ops' dense masks and scores, not a GPU kernel's O(S) state; "
        "'rest' is per token. Step ms: forward + "
        f"backward, slowest rank, median of {spec['reps']} steps after a measured one. Loss vs cp 1: the mean of "
        "the ranks' losses against one process's, relative.",
        "",
        *comm[0],
        "",
        f"Bytes per layer and rank (sent, or received for all-gather), b = 4; formula: ulysses (cp - 1) / cp x "
        f"(2 H + 2 K) B L d b, allgather (cp - 1) / cp x 2 K B S d b, each direction. "
        f"{'Every case matches it exactly.' if comm[1] else 'MISMATCH: see the rows marked NO.'} "
        f"Spawn and run: {time.perf_counter() - start:.0f} s.",
    ]


def check_gloo(parser, spec: dict) -> None:
    """The layouts the gloo run would build, refused before any process starts (errors name the numbers)."""
    for attention in spec["attentions"]:
        attn_cfg = attention_config(spec, attention)
        for cp in spec["cps"]:
            for style in spec["styles"]:
                try:
                    check_cp(cp, 1, style, spec["seq"], attn_cfg, spec["layers"])
                except ConfigError as err:
                    parser.error(f"--gloo-seq {spec['seq']} at --gloo-cps {cp} ({attention}, {style}): {err}")


def cp_list(text: str) -> list[int]:
    return [int(c) for c in text.split(",")]


def parse(argv: list[str]):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU): the unit test's run")
    parser.add_argument(
        "--parts", help="comma-separated, of gloo (CPU only) and ops; default: gloo,ops on the CPU, ops on a GPU"
    )
    parser.add_argument("--seqs", help="op times: comma-separated S (GPU default 32768,131072)")
    parser.add_argument("--op-cps", help="op times: comma-separated cp degrees (GPU default 2,4,8)")
    parser.add_argument("--heads", type=int)
    parser.add_argument("--kv-heads", type=int)
    parser.add_argument("--head-dim", type=int)
    parser.add_argument("--moba", help="op times: MoBA block/topk (GPU default 512/3)")
    parser.add_argument("--gloo-seq", type=int, help=f"CPU/gloo: tokens in the row (default {GLOO['seq']})")
    parser.add_argument("--gloo-cps", help="CPU/gloo: comma-separated cp degrees, 1 first (default 1,2,4)")
    parser.add_argument("--reps", type=int, help="CPU/gloo: timed steps after the measured one (default 2)")
    parser.add_argument("--timeout", type=float, default=900.0, help="CPU/gloo: seconds before the ranks are killed")
    parser.add_argument("--rep-ms", type=float, default=100.0, help="GPU: do_bench's timing window per cell")
    parser.add_argument(
        "--slow-rep-ms", type=float, default=1000.0, help="GPU: event-timed calls of a slow cell fill this"
    )
    parser.add_argument("--cpu-reps", type=int, default=3, help="CPU op times: calls per cell")
    parser.add_argument("--budget", type=float, default=120.0, help="op times: seconds after which no new case starts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="also write the report to this file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    if args.quick and args.device == "cuda":
        parser.error("--quick is the CPU's tiny run; on a GPU lower --seqs / --op-cps instead")
    defaults = OPS_GPU if args.device == "cuda" else OPS_QUICK if args.quick else OPS_CPU
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.seqs, args.op_cps = cp_list(str(args.seqs)), cp_list(str(args.op_cps))
    args.moba = tuple(int(x) for x in str(args.moba).split("/"))
    block = args.moba[0]
    if args.heads % args.kv_heads:
        parser.error(f"--kv-heads {args.kv_heads} must divide --heads {args.heads}")
    if min(args.op_cps) < 2:
        parser.error(f"--op-cps {min(args.op_cps)} must be >= 2 (cp 1 is the whole op, always timed)")
    for S in args.seqs:
        for cp in args.op_cps:
            if S % (2 * cp * block):
                parser.error(
                    f"--seqs {S} must be divisible by 2 x cp x MoBA block = 2 x {cp} x {block}: every rank holds "
                    "two chunks of whole blocks"
                )
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    args.parts = (args.parts or ("ops" if args.device == "cuda" else "gloo,ops")).split(",")
    unknown = [p for p in args.parts if p not in ("gloo", "ops")]
    if unknown or not args.parts:
        parser.error(f"--parts: unknown {', '.join(unknown)}; known: gloo, ops")
    if "gloo" in args.parts and args.device == "cuda":
        parser.error("--parts gloo runs gloo ranks on the CPU: give --device cpu")
    args.gloo = None
    if "gloo" in args.parts:
        spec = dict(GLOO_QUICK if args.quick else GLOO, seed=args.seed)
        if args.gloo_seq is not None:
            spec["seq"] = args.gloo_seq
        if args.gloo_cps is not None:
            spec["cps"] = cp_list(args.gloo_cps)
        if args.reps is not None:
            spec["reps"] = args.reps
        if spec["cps"][0] != 1 or spec["reps"] < 1:
            parser.error(f"--gloo-cps {spec['cps']} must start at 1 (the baseline) and --reps {spec['reps']} be >= 1")
        check_gloo(parser, spec)
        args.gloo = spec
    return args


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    t0 = time.perf_counter()
    lines = [
        f"## Context parallelism, {args.device}, torch {torch.__version__}",
        "",
        f"`{' '.join(['python benchmarks/context_parallel.py', *argv])}`",
        "",
    ]
    if args.gloo is not None:
        lines += gloo_section(args) + [""]
    if "ops" in args.parts:
        lines += op_section(args)
    lines.append(f"\nRun time {time.perf_counter() - t0:.0f} s.")
    return emit("\n".join(lines), args.output)


if __name__ == "__main__":
    main()
