"""The CUDA half of benchmarks/ep_overlap.py: step times and a profiler's view of what overlapped.

One GPU: ep > 1 needs more GPUs, so the exchange is the simulated link on a side stream (a copy,
then `torch.cuda._sleep` for bytes / --link-gbps, unscaled: this is the device the bandwidth is
quoted for); P only changes L = E / P experts. Two or more GPUs (torchrun): the real NCCL exchange
over all of them, P = the world size. Either way a torch.profiler trace of a few steps per
dispatcher gives, per communication stream, |comm ∩ compute| / |comm|: comm = every kernel and copy
on a stream that runs NCCL or sleep kernels, compute = the kernels on the stream with the most
other kernel time (the default stream), each stream's intervals merged before intersecting.

Shape legend: as in ep_overlap.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from collections import defaultdict
from functools import partial

import torch
import torch.distributed as dist
from ep_overlap_core import NOCOMM, PLAIN, Spec, fraction_hidden, inputs, interleaved_steps, pct, step, variants
from ep_overlap_links import CountingExchange, CudaSimulatedLink, gpu_cycles_per_s
from torch.profiler import ProfilerActivity, profile

COMM_KERNELS = ("nccl", "spin_kernel")
"""Kernel names (lower case substrings) that mark a stream as a communication stream."""
DEVICE_EVENTS = ("kernel", "gpu_memcpy", "gpu_memset")
PROFILED_STEPS = 3


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of [start, end) intervals as sorted, disjoint intervals."""
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(s, e) for s, e in out]


def length(intervals: list[tuple[float, float]]) -> float:
    return sum(e - s for s, e in intervals)


def intersection(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length of the intersection of two merged (sorted, disjoint) interval lists."""
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def stream_overlap(trace: dict) -> dict[int, float]:
    """{comm stream: |comm ∩ compute| / |comm|} from a chrome trace (torch.profiler's export)."""
    spans: dict[int, list[tuple[float, float]]] = defaultdict(list)
    names: dict[int, set[str]] = defaultdict(set)
    for ev in trace.get("traceEvents", []):
        if ev.get("ph") != "X" or ev.get("cat") not in DEVICE_EVENTS or "stream" not in ev.get("args", {}):
            continue
        stream = int(ev["args"]["stream"])
        spans[stream].append((float(ev["ts"]), float(ev["ts"]) + float(ev["dur"])))
        names[stream].add(ev.get("name", "").lower())
    comm = [s for s in spans if any(key in name for name in names[s] for key in COMM_KERNELS)]
    others = [s for s in spans if s not in comm]
    if not comm or not others:
        return {}
    compute = merged(spans[max(others, key=lambda s: length(merged(spans[s])))])
    result = {}
    for s in comm:
        intervals = merged(spans[s])
        result[s] = intersection(intervals, compute) / length(intervals) if intervals else float("nan")
    return result


def profiled_overlap(fn) -> dict[int, float]:
    """stream_overlap of PROFILED_STEPS calls of fn() (after one untraced)."""
    fn()
    torch.cuda.synchronize()
    # Device activity only: the kernels' streams and times are all this reads, and the trace stays small.
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_STEPS):
            fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory(prefix="ep-trace-") as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            return stream_overlap(json.load(f))


def gpu_report(args: argparse.Namespace, spec: Spec, kinds: dict) -> list[str]:
    """The CUDA rows; under torchrun only rank 0 returns lines (the others return none)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1:
        dist.init_process_group("nccl")
        rank, eps = dist.get_rank(), [world]
        spec.check(eps)
        link_line = f"real NCCL all-to-all over {world} GPUs"

        def transport(P: int):
            return CountingExchange(dist.group.WORLD)
    else:
        rank, eps = 0, args.eps
        cycles = gpu_cycles_per_s()
        bytes_per_s = args.link_gbps * 1e9
        link_line = (
            f"SIMULATED link on one GPU: side-stream copy + sleep for bytes / {args.link_gbps:g} GB/s "
            f"(+ {args.latency_us:g} us), {cycles / 1e9:.2f} G sleep cycles/s"
        )

        def transport(P: int):
            return CudaSimulatedLink(P, bytes_per_s, cycles, args.latency_us * 1e-6)

    x_TD, dy_TD = inputs(spec, rank)
    sync = (lambda: (torch.cuda.synchronize(), dist.barrier())) if world > 1 else torch.cuda.synchronize
    lines = ["", f"## {torch.cuda.get_device_name()}: {link_line}", ""]
    lines += ["| ep | routing | dispatcher | step ms | hidden (times) | comm ∩ compute / comm, per stream |"]
    lines += ["|---|---|---|---|---|---|"]
    for P in eps:
        for routing in args.routings:
            group = variants(spec, P, rank, kinds, routing == "balanced", lambda P=P: transport(P))
            times = interleaved_steps(group, x_TD, dy_TD, args.reps, args.warmup, sync)
            rows = {}
            for name, (layer, _) in group.items():
                overlap = profiled_overlap(partial(step, layer, x_TD, dy_TD)) if name != NOCOMM else {}
                rows[name] = (statistics.median(times[name]), overlap)
            for name, (ms, overlap) in rows.items():
                hidden = fraction_hidden(ms, rows[PLAIN][0], rows[NOCOMM][0]) if name != NOCOMM else None
                per_stream = ", ".join(f"stream {s}: {100 * f:.0f}%" for s, f in sorted(overlap.items())) or "—"
                lines.append(f"| {P} | {routing} | {name} | {ms:.2f} | {pct(hidden)} | {per_stream} |")
    if world > 1:
        dist.destroy_process_group()
    return lines if rank == 0 else []
