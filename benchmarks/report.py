"""What every benchmark script shares: CPU timing and writing its report.

The scripts run as `python benchmarks/NAME.py`, which puts this folder on sys.path (the tests
put it there too: tests/conftest.py), so they import this module as `report`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path


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
