"""What every benchmark script shares: CPU timing, spawning gloo ranks, and writing its report.

The scripts run as `python benchmarks/NAME.py`, which puts this folder on sys.path (the tests
put it there too: tests/conftest.py), so they import this module as `report`.
"""

from __future__ import annotations

import os
import pickle
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch.multiprocessing as mp


def cpu_median_ms(fn: Callable[[], object], reps: int, warmup: int = 0) -> float:
    """Median wall milliseconds of `reps` calls of fn() after `warmup` untimed ones (CPU: no
    asynchronous work to wait for; GPU timings use triton.testing.do_bench or CUDA events)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def cpu_interleaved_ms(
    fns: dict[str, Callable[[], object]], reps: int, settle: int = 0, clock: Callable[[], float] = time.perf_counter
) -> dict[str, list[float]]:
    """Wall milliseconds of `reps` rounds, each calling every fn in turn: {name: its times}. Load
    from other processes that comes and goes then falls on every fn alike, so their ratios are
    steadier than those of one fn timed after another. `settle` untimed calls precede each timed
    one, so that a fn is not timed right after another's: one that leaves gigabytes to the OS
    makes the next pay for faulting its pages back in. `clock` is wall time by default;
    time.process_time counts only the time this process ran (all its threads), which on a
    machine shared with other jobs leaves out the time it waited for a core."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            for _ in range(settle):
                fn()
            start = clock()
            fn()
            times[name].append((clock() - start) * 1e3)
    return times


def emit(report: str, output: str | None) -> str:
    """Print the report and, when `output` names a file, write it there too; returns the report."""
    print(report, flush=True)
    if output:
        Path(output).write_text(report + "\n")
    return report


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_gloo_ranks(entry: Callable, world: int, payload: tuple, timeout: float, prefix: str) -> list:
    """entry(rank, world, port, *payload, result_dir, timeout) on `world` spawned processes, each
    writing its result to result_dir/<rank>.pkl; the results, by rank. A rank that raises fails the
    call with its traceback; past `timeout` seconds every rank is killed and TimeoutError names
    the ranks still running."""
    with tempfile.TemporaryDirectory(prefix=prefix) as result_dir:
        context = mp.start_processes(
            entry,
            args=(world, free_port(), *payload, result_dir, timeout),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=max(0.0, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    alive = [rank for rank, p in enumerate(context.processes) if p.is_alive()]
                    raise TimeoutError(f"the gloo ranks ran past --timeout {timeout:.0f} s; ranks {alive} were running")
        finally:
            for p in context.processes:
                if p.is_alive():
                    p.kill()
                p.join()
        results = []
        for rank in range(world):
            with open(os.path.join(result_dir, f"{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results
