"""The console: a progress line redrawn in place after every step, or printed plainly per logged step.

Modes: "live" redraws a rich progress line (and an MoE line) in place; "plain" prints
one compact line per logged `update`, fit for log files; "none" prints nothing; "auto" is
live on a terminal and plain otherwise.

`update` looks for these scalar names (others are only logged): loss, lr,
tokens_per_s, mfu and eval/loss (also spelled eval_loss); a "train/" prefix is allowed
on each. MoE scalars are read per layer, `moe/layer{i}/{name}` (or `moe/{name}` for a
single figure), with name in load_imbalance (max / mean tokens per expert), aux_loss,
z_loss and dropped_tokens; the console shows the worst layer's imbalance, the mean
aux and z losses over layers and the total of dropped tokens.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

__all__ = ["Progress", "format_duration", "format_moe", "format_rate"]

MODES = ("auto", "live", "plain", "none")
NAMES = {
    "loss": ("loss", "train/loss"),
    "lr": ("lr", "train/lr"),
    "tokens_per_s": ("tokens_per_s", "train/tokens_per_s"),
    "mfu": ("mfu", "train/mfu"),
    "eval_loss": ("eval/loss", "eval_loss", "train/eval_loss"),
}
# Between log intervals a live line is redrawn at most this often (seconds).
REDRAW_SECONDS = 0.1
# moe/<name> or moe/layer<i>/<name>
MOE_KEY = re.compile(r"^moe/(?:layer(\d+)/)?(load_imbalance|aux_loss|z_loss|dropped_tokens)$")


class Progress:
    """Reports training progress: step, loss, learning rate, tokens/s, elapsed time and ETA.

    The loop calls `update` after every step: with all its scalars at a log interval, and with
    `logged=False` (loss, learning rate, tokens/s so far) in between. Live mode redraws on each
    (between log intervals at most every REDRAW_SECONDS, as a frame costs about a millisecond);
    plain mode prints the logged ones only.

    Elapsed time counts from `started` (the run's start; default: construction). The ETA's
    rate counts only this process's training steps, from the end of its first one: start-up,
    the step-0 evaluation and the first step's compilation and warm-up are left out, and so is
    time passed to `add_pause` (evaluations, saves). There is no ETA before a second step ends.
    """

    def __init__(
        self,
        mode: str,
        total_steps: int,
        *,
        started: float | None = None,
        file: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {', '.join(MODES)}, got '{mode}'")
        self.file = file if file is not None else sys.stdout
        self.mode = _resolve_mode(mode, self.file)
        self.total_steps = total_steps
        self._clock = clock
        self._started = clock() if started is None else started
        # (time, step, paused seconds so far) at the end of this process's first step.
        self._first: tuple[float, int, float] | None = None
        self._paused = 0.0
        # Live mode shows each field's latest value (an evaluation's update carries only its loss).
        self._latest: dict[str, float] = {}
        self._moe: str | None = None
        self._drawn_at = -math.inf
        self._live = None
        if self.mode == "live":
            self._start_live()

    # ---- timing --------------------------------------------------------------------

    def elapsed(self, now: float | None = None) -> float:
        return (self._clock() if now is None else now) - self._started

    def add_pause(self, seconds: float) -> None:
        """Leave `seconds` spent outside training steps (evaluating, saving) out of the ETA's rate."""
        self._paused += seconds

    def eta_seconds(self, step: int, now: float | None = None) -> float | None:
        """Seconds left to `total_steps` at the rate of this process's steps since its first one."""
        if self._first is None or step <= self._first[1]:
            return None
        now = self._clock() if now is None else now
        since, first_step, paused_then = self._first
        seconds_per_step = (now - since - (self._paused - paused_then)) / (step - first_step)
        return max(self.total_steps - step, 0) * seconds_per_step

    # ---- output --------------------------------------------------------------------

    def update(self, step: int, scalars: dict[str, Any], *, logged: bool = True) -> None:
        """Report the end of `step`; `logged=False` between log intervals (see the class)."""
        now = self._clock()
        if self._first is None:
            self._first = (now, step, self._paused)
        if self.mode == "plain" and logged:
            print(self.format_line(step, scalars, now), file=self.file, flush=True)
            moe = format_moe(scalars)
            if moe:
                print(moe, file=self.file, flush=True)
        elif self.mode == "live":
            self._latest.update({name: value for name in NAMES if (value := _lookup(scalars, name)) is not None})
            self._moe = format_moe(scalars) or self._moe
            if logged or now - self._drawn_at >= REDRAW_SECONDS:
                self._drawn_at = now
                self._draw(step, self.format_line(step, self._latest, now), self._moe)

    def format_line(self, step: int, scalars: dict[str, Any], now: float | None = None) -> str:
        """`step  40/300 | loss 2.4512 | lr 2.9e-03 | 41.2k tok/s | elapsed 1m02s | eta 6m43s`, fields present only when known."""
        now = self._clock() if now is None else now
        width = len(str(self.total_steps))
        parts = [f"step {step:>{width}}/{self.total_steps}"]
        loss = _lookup(scalars, "loss")
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        eval_loss = _lookup(scalars, "eval_loss")
        if eval_loss is not None:
            parts.append(f"eval {eval_loss:.4f}")
        lr = _lookup(scalars, "lr")
        if lr is not None:
            parts.append(f"lr {lr:.1e}")
        tokens_per_s = _lookup(scalars, "tokens_per_s")
        if tokens_per_s is not None:
            parts.append(f"{format_rate(tokens_per_s)} tok/s")
        mfu = _lookup(scalars, "mfu")
        if mfu is not None:
            parts.append(f"mfu {100 * mfu:.1f}%")
        parts.append(f"elapsed {format_duration(self.elapsed(now))}")
        eta = self.eta_seconds(step, now)
        if eta is not None:
            parts.append(f"eta {format_duration(eta)}")
        return " | ".join(parts)

    def message(self, text: str) -> None:
        """Print a line; in live mode it appears above the progress line."""
        if self.mode == "plain":
            print(text, file=self.file, flush=True)
        elif self.mode == "live":
            self._live.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- live mode -----------------------------------------------------------------

    def _start_live(self) -> None:
        from rich.console import Console
        from rich.live import Live

        # Redrawn only on update: a refresh thread would add nothing but a lock per frame.
        self._live = Live(console=Console(file=self.file), auto_refresh=False, transient=False)
        self._live.start()

    def _draw(self, step: int, line: str, moe: str | None) -> None:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        row = Table.grid(padding=(0, 1))
        row.add_row(
            ProgressBar(total=max(self.total_steps, 1), completed=step, width=24),
            Text(line, no_wrap=True, overflow="ellipsis"),
        )
        rows = [row] + ([Text(moe)] if moe else [])
        self._live.update(Group(*rows), refresh=True)


def format_moe(scalars: dict[str, Any]) -> str | None:
    """`  moe | load max/mean 1.32 (layer 3) | aux 1.2e-02 | z 3.4e-04 | dropped 0`, or None without MoE scalars.

    Zero aux and z losses (switched off) are left out; dropped tokens always show.
    """
    by_name: dict[str, list[tuple[int | None, float]]] = {}
    for key, value in scalars.items():
        match = MOE_KEY.match(key)
        if match and value is not None:
            layer = int(match.group(1)) if match.group(1) is not None else None
            by_name.setdefault(match.group(2), []).append((layer, float(value)))
    if not by_name:
        return None
    parts = []
    if "load_imbalance" in by_name:
        layer, worst = max(by_name["load_imbalance"], key=lambda item: item[1])
        parts.append(f"load max/mean {worst:.2f}" + (f" (layer {layer})" if layer is not None else ""))
    for name, label in (("aux_loss", "aux"), ("z_loss", "z")):
        values = [v for _, v in by_name.get(name, [])]
        if values and any(values):
            parts.append(f"{label} {sum(values) / len(values):.1e}")
    if "dropped_tokens" in by_name:
        parts.append(f"dropped {sum(v for _, v in by_name['dropped_tokens']):.0f}")
    return "  moe | " + " | ".join(parts) if parts else None


def format_duration(seconds: float) -> str:
    """45s, 1m02s, 2h03m, 3d04h."""
    if not math.isfinite(seconds):
        return "?"
    total = int(round(max(seconds, 0.0)))
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def format_rate(value: float) -> str:
    """950, 41.2k, 1.23M."""
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}"


def _lookup(scalars: dict[str, Any], name: str) -> float | None:
    for key in NAMES[name]:
        if key in scalars and scalars[key] is not None:
            return float(scalars[key])
    return None


def _resolve_mode(mode: str, file: TextIO) -> str:
    if mode != "auto":
        return mode
    is_tty = getattr(file, "isatty", lambda: False)()
    return "live" if is_tty and os.environ.get("TERM") != "dumb" else "plain"
