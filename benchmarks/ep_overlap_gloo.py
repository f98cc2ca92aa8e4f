"""The real-exchange rows of benchmarks/ep_overlap.py: P spawned CPU processes, gloo, one thread each.

One spawn of max(eps) processes serves every degree: degree P runs on ranks [0, P) (a gloo subgroup)
while the others wait at a barrier. Each rank builds its slice of the layer (ep_overlap_core), its
own tokens, and times forward + backward; a step's time is the slowest rank's (all ranks start
together after a barrier). The no-comm row runs the same P processes at once with the loopback
transport, so it meets the same contention for the cores.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pickle
import statistics

import torch
import torch.distributed as dist
from ep_overlap_core import Spec, dispatcher_kinds, inputs, interleaved_steps, variants
from ep_overlap_links import CountingExchange
from report import spawn_gloo_ranks


def rank_rows(args: dict, spec: Spec, pg, P: int) -> list[dict]:
    """This rank's part of degree P: every routing, no-comm and every dispatcher; rows with the
    per-step slowest rank's least and median milliseconds."""
    rank = dist.get_rank(pg)
    kinds = dispatcher_kinds(args["chunks"])
    x_TD, dy_TD = inputs(spec, rank)
    rows = []
    for routing in args["gloo_routings"]:
        group = variants(spec, P, rank, kinds, routing == "balanced", lambda: CountingExchange(pg))
        times = interleaved_steps(group, x_TD, dy_TD, args["reps"], args["warmup"], lambda: dist.barrier(pg))
        for name in group:
            slowest = torch.tensor(times[name], dtype=torch.float64)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=pg)
            ms = slowest.tolist()
            rows.append({"ep": P, "routing": routing, "dispatcher": name, "ms": statistics.median(ms), "min": min(ms)})
    return rows


def _entry(rank: int, world: int, port: int, args: dict, spec: Spec, result_dir: str, timeout: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(args["threads"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
    rows = []
    try:
        for P in args["eps"]:
            # Every rank creates every subgroup, in the same order (new_group is collective).
            group = dist.new_group(list(range(P)))
            if rank < P:
                rows += rank_rows(args, spec, group, P)
            dist.barrier()
    finally:
        dist.destroy_process_group()
    with open(os.path.join(result_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(rows, f)


def gloo_rows(args: argparse.Namespace, spec: Spec) -> list[dict]:
    """Rank 0's rows (every rank holds the same maxima); past --timeout every rank is killed."""
    plain = {k: getattr(args, k) for k in ("eps", "chunks", "gloo_routings", "reps", "warmup", "threads")}
    return spawn_gloo_ranks(_entry, max(args.eps), (plain, spec), args.timeout, "ep-bench-")[0]
