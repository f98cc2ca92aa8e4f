"""Expert-parallel communication: how much of it the overlapped dispatcher hides, and how many bytes move.

For each ep degree P, the MoE layer's forward + backward on one rank (T tokens per rank) with

- the plain all-to-all dispatcher (each exchange waited for at once),
- the overlapped dispatcher (parallel/overlapped_dispatch.py) at C chunks,
- no-comm: every exchange replaced by a local copy of what was sent (ep_overlap_links.py),

and the fraction of communication hidden, 1 - (T_overlap - T_nocomm) / (T_plain - T_nocomm).

Parts (--parts):

- sim: one process per P with a SIMULATED link (ep_overlap_links.SimulatedLink): the local copy,
  then completion after latency + bytes leaving the rank / bandwidth, exchanges one at a time, the
  waiting done asleep. The bandwidth (--link-gbps, e.g. 50 inter-node, 150 NVLink) is scaled by
  this CPU's GEMM throughput at the expert shape over an H100's (its dense bf16 peak from
  train/flops.py times --h100-fraction), and by the element size over bf16's, so that bytes per
  FLOP cost what they would on an H100 cluster training in bf16. Loopback needs no peers, so P
  only changes L = E / P experts per rank. Balanced routing (round-robin, every expert T * k / E
  rows) and real routing (the random-init router's choices).
- gloo: P spawned CPU processes exchanging over gloo for real, one thread each. On two cores they
  show almost no hiding: gloo's copies run on the same cores as the experts.
- bytes: bytes per token per layer moved by the exchanges, counted at the seam in one step, next
  to the formula k (4 width element_bytes + 2 x 4) (rows four times, fp32 routing weights twice),
  with width D and with moe.dispatch_dim r = D / 4.
- On CUDA (--device cuda; ep_overlap_gpu.py): one GPU runs the simulated link on a side stream, two
  or more (torchrun) the real NCCL exchange; a torch.profiler trace gives |comm ∩ compute| / |comm|.

    python benchmarks/ep_overlap.py                          # CPU: sim, gloo and bytes, ep 2 and 4 (~3 min)
    python benchmarks/ep_overlap.py --parts sim --link-gbps 50
    python benchmarks/ep_overlap.py --device cuda            # one GPU: simulated link on a side stream
    torchrun --nproc-per-node 8 benchmarks/ep_overlap.py --device cuda   # real NCCL all-to-all

Shape legend: T tokens per rank, D model dim, E routed experts, k experts per token, P ep ranks.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from ep_overlap_core import (
    DTYPES,
    NOCOMM,
    PLAIN,
    Spec,
    analytic_bytes_per_token,
    build_layer,
    dispatcher_kinds,
    fraction_hidden,
    inputs,
    interleaved_steps,
    pct,
    step,
    variants,
)
from ep_overlap_links import LoopbackExchange, SimulatedLink
from report import emit

from sparsetron.model.config import MoEConfig
from sparsetron.train.flops import PEAK_BF16_TFLOPS

BF16_BYTES = 2
# Per rank. CPU: the CPU MoE shape; GPU: the MoE anchor's expert shape at half its tokens.
CPU_DEFAULTS = dict(tokens=4096, dim=256, experts=16, hidden=128, top_k=4, dtype="fp32", eps="2,4", reps=3)
GPU_DEFAULTS = dict(tokens=8192, dim=2048, experts=64, hidden=1408, top_k=6, dtype="bf16", eps="8", reps=10)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--parts", default=None, help="comma list of sim, gloo, bytes (CPU; default all) or gpu, bytes")
    p.add_argument("--tokens", type=int, default=None, help="tokens per rank (CPU 4096, GPU 8192)")
    p.add_argument("--dim", type=int, default=None, help="model dim D (CPU 256, GPU 2048)")
    p.add_argument("--experts", type=int, default=None, help="routed experts at G = 1 (CPU 16, GPU 64)")
    p.add_argument("--hidden", type=int, default=None, help="expert hidden size at G = 1 (CPU 128, GPU 1408)")
    p.add_argument("--top-k", type=int, default=None, help="experts per token at G = 1 (CPU 4, GPU 6)")
    p.add_argument("--granularity", type=int, default=1)
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="CPU fp32, GPU bf16")
    p.add_argument("--eps", default=None, help="ep degrees, comma list (CPU 2,4; one GPU 8)")
    p.add_argument("--chunks", default="1,2,4,8", help="overlap_chunks C of the overlapped dispatcher's rows")
    p.add_argument("--routings", default="balanced,real", help="of the sim and gpu parts")
    p.add_argument("--gloo-routings", default="balanced", help="of the gloo part (each routing ~1 min)")
    p.add_argument("--link-gbps", type=float, default=150.0, help="simulated link, GB/s at H100 speed")
    p.add_argument("--latency-us", type=float, default=0.0, help="simulated link latency per exchange, at H100 speed")
    p.add_argument("--h100-fraction", type=float, default=0.5, help="of the H100 dense bf16 peak its experts reach")
    p.add_argument("--reps", type=int, default=None, help="timed steps per row (CPU 3, GPU 10)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (one core each)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before the gloo ranks are killed")
    p.add_argument("--output", default=None, help="also write the report to this file")
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device")
    defaults = GPU_DEFAULTS if gpu else CPU_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.parts = (args.parts or ("gpu,bytes" if gpu else "sim,gloo,bytes")).split(",")
    known = {"gpu", "bytes"} if gpu else {"sim", "gloo", "bytes"}
    for part in args.parts:
        if part not in known:
            raise ValueError(f"--parts {part!r}: on {args.device} one of {', '.join(sorted(known))}")
    args.eps = [int(v) for v in args.eps.split(",")]
    args.chunks = [int(v) for v in args.chunks.split(",")]
    for name in ("routings", "gloo_routings"):
        setattr(args, name, getattr(args, name).split(","))
        for routing in getattr(args, name):
            if routing not in ("balanced", "real"):
                raise ValueError(f"--{name.replace('_', '-')} {routing!r}: balanced or real")
    for name in ("link_gbps", "h100_fraction", "reps", "threads"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if any(c < 1 for c in args.chunks):
        raise ValueError(f"--chunks {args.chunks}: every C must be >= 1")
    return args


def spec_of(args: argparse.Namespace) -> Spec:
    fields = ("tokens", "dim", "experts", "hidden", "top_k", "granularity", "dtype", "device")
    spec = Spec(**{name: getattr(args, name) for name in fields})
    spec.check(args.eps)
    return spec


def cpu_gemm_tflops(spec: Spec) -> float:
    """This CPU's GEMM throughput at the expert shape (one expert's rows under balanced routing times
    its gate/up weight) in the benchmark's dtype."""
    rows = max(spec.tokens * spec.k // spec.num_experts, 1)
    dtype = DTYPES[spec.dtype]
    x = torch.randn(rows, spec.dim, dtype=dtype)
    w = torch.randn(spec.dim, 2 * spec.expert_hidden, dtype=dtype)
    x @ w
    best_s = float("inf")
    for _ in range(20):
        # The least time: other jobs on a shared machine only slow a GEMM down.
        start = time.perf_counter()
        x @ w
        best_s = min(best_s, time.perf_counter() - start)
    return 2 * rows * spec.dim * 2 * spec.expert_hidden / best_s / 1e12


def link_scale(args: argparse.Namespace, spec: Spec) -> tuple[float, float, list[str]]:
    """(bytes/s, latency s) of the simulated link on this CPU, and the lines that say how."""
    cpu = cpu_gemm_tflops(spec)
    h100 = dict(PEAK_BF16_TFLOPS)["H100"] * args.h100_fraction
    ratio = cpu / h100
    element = DTYPES[spec.dtype].itemsize / BF16_BYTES
    bytes_per_s = args.link_gbps * 1e9 * ratio * element
    latency_s = args.latency_us * 1e-6 / ratio
    lines = [
        f"- this CPU's GEMM at the expert shape ({spec.dtype}, {args.threads} thread, best of 20): {cpu * 1e3:.1f} GFLOP/s",
        f"- H100: {dict(PEAK_BF16_TFLOPS)['H100']:.0f} TFLOP/s dense bf16 peak x {args.h100_fraction} achieved "
        f"= {h100:.0f} TFLOP/s; ratio CPU / H100 = {ratio:.3g}",
        f"- element size {spec.dtype} / bf16 = {element:g} (the cluster moves bf16 rows, this run {spec.dtype})",
        f"- SIMULATED link: {args.link_gbps:g} GB/s x {ratio:.3g} x {element:g} = {bytes_per_s / 1e6:.2f} MB/s "
        f"here, latency {args.latency_us:g} us at H100 speed = {latency_s * 1e3:.2f} ms here",
    ]
    return bytes_per_s, latency_s, lines


def simulated(args, spec: Spec, kinds: dict, bytes_per_s: float, latency_s: float) -> list[dict]:
    """Each ep degree and routing: no-comm, then every dispatcher over the simulated link."""
    x_TD, dy_TD = inputs(spec, 0)
    rows = []
    for P in args.eps:
        for routing in args.routings:
            group = variants(
                spec, P, 0, kinds, routing == "balanced", lambda P=P: SimulatedLink(P, bytes_per_s, latency_s)
            )
            times = interleaved_steps(group, x_TD, dy_TD, args.reps, args.warmup)
            steps = args.reps + args.warmup
            for name, (_, link) in group.items():
                busy, waited = (link.busy_s, link.waited_s) if isinstance(link, SimulatedLink) else (0.0, 0.0)
                ms = times[name]
                rows.append(
                    {"ep": P, "routing": routing, "dispatcher": name, "ms": statistics.median(ms), "min": min(ms)}
                    | {"busy": busy / steps * 1e3, "waited": waited / steps * 1e3}
                )
    return add_fractions(rows)


def add_fractions(rows: list[dict]) -> list[dict]:
    """Each row's fraction hidden against its (ep, routing) group's plain and no-comm rows, from the
    least step time of each: other jobs on a shared machine only ever add time to a step."""
    for row in rows:
        group = {r["dispatcher"]: r["min"] for r in rows if (r["ep"], r["routing"]) == (row["ep"], row["routing"])}
        hidden = fraction_hidden(row["min"], group[PLAIN], group[NOCOMM])
        row["hidden"] = None if row["dispatcher"] == NOCOMM else hidden
    return rows


def time_table(rows: list[dict], link: bool) -> list[str]:
    head = "| ep | routing | dispatcher | least step ms | median ms | hidden (times) |"
    rule = "|---|---|---|---|---|---|"
    if link:
        head += " link busy ms | waited ms | hidden (waits) |"
        rule += "---|---|---|"
    lines = [head, rule]
    for r in rows:
        line = (
            f"| {r['ep']} | {r['routing']} | {r['dispatcher']} | {r['min']:.1f} | {r['ms']:.1f} | {pct(r['hidden'])} |"
        )
        if link:
            waits = 1 - r["waited"] / r["busy"] if r["busy"] > 0 else None
            busy = f"{r['busy']:.1f}" if r["busy"] else "—"
            waited = f"{r['waited']:.1f}" if r["busy"] else "—"
            line += f" {busy} | {waited} | {pct(waits)} |"
        lines.append(line)
    return lines


def bytes_table(args, spec: Spec) -> list[str]:
    """Bytes per token per layer, counted at the seam over one step (balanced routing), beside the formula."""
    element = DTYPES[spec.dtype].itemsize
    lines = [
        "| ep | width | measured all rows B/token | measured leaving B/token | formula all | formula leaving "
        "| counts B/token |",
        "|---|---|---|---|---|---|---|",
    ]
    has_dispatch_dim = "dispatch_dim" in MoEConfig.__dataclass_fields__
    r = spec.dim // 4
    for P in args.eps:
        kind = dispatcher_kinds([])[PLAIN]
        for width, dispatch_dim in ((spec.dim, 0), (r, r)):
            total, leaving = analytic_bytes_per_token(spec.k, width, element, P)
            name = f"D = {width}" if not dispatch_dim else f"dispatch_dim r = {width}"
            if dispatch_dim and not has_dispatch_dim:
                measured = "— (no moe.dispatch_dim in this commit's MoEConfig: formula only)"
                lines.append(f"| {P} | {name} | {measured} | — | {total} | {leaving:.0f} | — |")
                continue
            sub = Spec(**{**spec.__dict__, "dispatch_dim": dispatch_dim})
            exchange = LoopbackExchange(P)
            x_TD, dy_TD = inputs(sub, 0)
            step(build_layer(sub, P, 0, exchange, kind, balanced=True), x_TD, dy_TD)
            t = exchange.traffic
            lines.append(
                f"| {P} | {name} | {t.row_bytes / spec.tokens:.0f} | {t.leaving_bytes / spec.tokens:.0f} "
                f"| {total} | {leaving:.0f} | {t.count_bytes / spec.tokens:.3f} |"
            )
    return lines


def shape_line(args, spec: Spec) -> str:
    return (
        f"Shape per rank: T {spec.tokens} tokens, D {spec.dim}, E {spec.num_experts} experts of H "
        f"{spec.expert_hidden} (G {spec.granularity}), top {spec.k}, {spec.dtype}, dropless; "
        f"the least and the median of {args.reps} steps after {args.warmup}; {args.threads} thread(s) per rank."
    )


def main(argv: list[str] | None = None) -> str:
    threads = torch.get_num_threads()
    try:
        return _report(argv)
    finally:
        # Called as a library (the tests), the benchmark leaves the caller's torch threads as they were.
        torch.set_num_threads(threads)


def _report(argv: list[str] | None) -> str:
    args = parse_args(argv)
    spec = spec_of(args)
    kinds = dispatcher_kinds(args.chunks)
    out = ["# Expert-parallel overlap (benchmarks/ep_overlap.py)", "", shape_line(args, spec)]
    if "gpu" in args.parts:
        from ep_overlap_gpu import gpu_report

        rows = gpu_report(args, spec, kinds)
        if not rows:  # a torchrun rank other than 0: rank 0 reports
            return ""
        out += rows
    else:
        torch.set_num_threads(args.threads)
        if "sim" in args.parts:
            bytes_per_s, latency_s, how = link_scale(args, spec)
            out += ["", "## Simulated link (not a network: a local copy, then asleep until bytes / bandwidth)", ""]
            out += how + [""] + time_table(simulated(args, spec, kinds, bytes_per_s, latency_s), link=True)
            out += [
                "",
                "hidden (times): 1 - (T - T_nocomm) / (T_plain - T_nocomm) of the least step times (n/a: plain not",
                "slower than no-comm). hidden (waits): 1 - waited / link busy, the link's own account, which the",
                "load of other jobs on the machine does not move.",
                "Roughly min(1, T_nocomm / link busy) can hide at most: the link does not finish before its bytes are",
                "sent, and only compute can run meanwhile.",
            ]
        if "gloo" in args.parts:
            from ep_overlap_gloo import gloo_rows

            out += ["", "## Real gloo exchange (spawned CPU processes, one thread each)", ""]
            out += time_table(add_fractions(gloo_rows(args, spec)), link=False)
            out += [
                "",
                "gloo's copies and the loopback TCP they cross run on the same cores as the experts, and the P",
                "ranks share this machine's cores, so communication cannot run beside compute here: expect little",
                "or no hiding (or a negative fraction, where chunking only adds work). A step's time is the slowest",
                "rank's; hidden (times) as above.",
            ]
    if "bytes" in args.parts:
        out += ["", "## Bytes per token per layer (dispatch + combine, forward + backward; balanced routing)", ""]
        out += bytes_table(args, spec)
        out += [
            "",
            "formula: k (4 width element_bytes + 2 x 4): rows four times, fp32 routing weights twice; "
            "leaving: x (P - 1) / P. counts: the [E] int64 exchange.",
        ]
    return emit("\n".join(out), args.output)


if __name__ == "__main__":
    main()
