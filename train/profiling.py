"""metrics.profile_steps: a torch.profiler trace of a few training steps, one file per rank.

The file is a Chrome trace (`<run_dir>/profile/rank<r>_steps<a>-<b>.pt.trace.json`):
ui.perfetto.dev opens it, and so does TensorBoard's profiler plugin, which finds files
ending in .pt.trace.json under its --logdir. Shapes, memory and stacks are not recorded,
so a step's trace stays a few MB at most.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

__all__ = ["PROFILE_DIR", "StepProfiler"]

PROFILE_DIR = "profile"


class StepProfiler:
    """Profiles steps `first..last` (1-based, inclusive) of those this process runs after `start_step`.

    The loop calls `before_step(n)` and `after_step(n)` around step n; `after_step` returns
    a line for the console once the trace is written. A resumed run records the steps of the
    range still ahead of it; `window` says which (None: none are) and `notice` says so.
    The step before the range, when this process runs it, warms the profiler up (its first
    recorded step would otherwise carry the profiler's own start-up).
    """

    def __init__(
        self, steps: list[int], start_step: int, run_dir: Path, device: torch.device, rank: int, world_size: int
    ):
        self.window: tuple[int, int] | None = None
        self.notice: str | None = None
        self._profiler = None
        self._path: Path | None = None
        self._world_size = world_size
        if not steps:
            return
        first, last = max(steps[0], start_step + 1), steps[1]
        if first > steps[0]:
            profiled = f"steps {first}-{last}" if first <= last else "none of them"
            self.notice = f"metrics.profile_steps={steps}: resumed at step {start_step}, profiling {profiled}"
        if first > last:
            return
        self.window = (first, last)
        self._path = Path(run_dir) / PROFILE_DIR / f"rank{rank}_steps{first}-{last}.pt.trace.json"
        self._begin = first - 1 if first - 1 > start_step else first
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with warnings.catch_warnings():
            # Without a step before the range (its first step is this process's first) there is no warm-up.
            warnings.filterwarnings("ignore", "Profiler won't be using warmup")
            steps_schedule = schedule(wait=0, warmup=first - self._begin, active=last - first + 1, repeat=1)
        self._profiler = profile(
            activities=activities,
            schedule=steps_schedule,
            on_trace_ready=self._write,
            record_shapes=False,
            profile_memory=False,
            with_stack=False,
        )

    def before_step(self, step: int) -> None:
        if self._profiler is not None and step == self._begin:
            self._profiler.start()

    def after_step(self, step: int) -> str | None:
        """After the last profiled step (the trace is written then): where it is; else None."""
        if self._profiler is None or not self._begin <= step <= self.window[1]:
            return None
        self._profiler.step()
        if step < self.window[1]:
            return None
        self._profiler.stop()
        self._profiler = None
        others = " and one file per other rank" if self._world_size > 1 else ""
        first, last = self.window
        return f"profile of steps {first}-{last} written to {self._path}{others}: open it in ui.perfetto.dev"

    def close(self) -> None:
        """Stop a profiler the loop left before the range's end (a stop signal), writing nothing."""
        if self._profiler is not None and self._profiler.profiler is not None:
            self._path = None
            self._profiler.stop()
        self._profiler = None

    def _write(self, prof: profile) -> None:
        if self._path is None:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self._path))
