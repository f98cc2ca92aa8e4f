"""One line for a failed job: how a rank reports its error, and which one the launcher prints.

A process prints `error: MESSAGE` on stderr. Under torchrun it also writes the message into
TORCHELASTIC_ERROR_FILE, in the JSON torch's elastic error handler writes
(torch.distributed.elastic.multiprocessing.errors), with the exact time and two facts of
sparsetron's own: whether the rank failed only because a peer did (a collective that broke,
train/watchdog.py) and whether every rank fails alike (the job config). Under sparsetron's
launcher (launch/torchrun.py sets SPARSETRON_LAUNCHER) the ranks print nothing; the launcher
prints the line of the rank that failed first (`summarize`), so the console holds one line
instead of one per rank inside torchrun's report.

Which rank failed first: a rank's own error before a peer's failure before a rank that died
without a message (a signal), then by time. An error every rank hits alike is printed as it
is; any other names its rank: `error: rank 3: ...`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

LAUNCHER_VAR = "SPARSETRON_LAUNCHER"
ERROR_FILE_VAR = "TORCHELASTIC_ERROR_FILE"


def report(
    message: str,
    *,
    error: bool = True,
    peer: bool = False,
    every_rank: bool = False,
    callstack: str | None = None,
) -> None:
    """Print `error: message` (`message` alone when not `error`) unless sparsetron's launcher
    collects it, and record it for torchrun. `peer`: this rank failed because another did;
    `every_rank`: every rank fails with this same message; `callstack`: an unexpected error's
    traceback, which Python prints (the message is only recorded)."""
    path = os.environ.get(ERROR_FILE_VAR)
    if path:
        now = time.time()
        info = {"py_callstack": callstack or message, "timestamp": str(int(now))}
        info.update(time=now, peer_failure=peer, every_rank=every_rank)
        record = {"message": {"message": message, "extraInfo": info}}
        # torchrun reads the file as soon as the process has exited: never half-written.
        tmp = Path(f"{path}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)
    if callstack is None and not (path and os.environ.get(LAUNCHER_VAR)):
        print(f"error: {message}" if error else message, file=sys.stderr)


def exit_status(exitcode: int) -> int:
    """A process's exit status as a shell reports it (killed by signal N: 128 + N)."""
    return 128 - exitcode if exitcode < 0 else exitcode


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _record(failure: Any) -> dict | None:
    """The error file's message entry (torch's `record` format or sparsetron's), None without one."""
    return failure.message if isinstance(failure.message, dict) else None


def _order(failure: Any) -> tuple[int, float]:
    record = _record(failure)
    if record is None:
        return 2, float(failure.timestamp)
    info = record.get("extraInfo", {})
    return int(bool(info.get("peer_failure"))), float(info.get("time", failure.timestamp))


def _died(rank: int, failure: Any) -> str:
    if failure.exitcode < 0:
        return f"rank {rank} (pid {failure.pid}) was killed by {_signal_name(-failure.exitcode)}"
    return f"rank {rank} (pid {failure.pid}) exited with status {failure.exitcode} without an error message"


def summarize(failures: dict[int, Any]) -> tuple[str, int]:
    """The line a launcher prints for torchrun's failed ranks (ProcessFailure by global rank)
    and the status it exits with: the first failed rank's."""
    rank = min(failures, key=lambda r: (*_order(failures[r]), r))
    first = failures[rank]
    status = exit_status(first.exitcode)
    record = _record(first)
    if record is None:
        return f"error: {_died(rank, first)}", status
    message = str(record.get("message", ""))
    messages = [str(r["message"]) if (r := _record(f)) is not None else None for f in failures.values()]
    alike = record.get("extraInfo", {}).get("every_rank") or (len(failures) > 1 and set(messages) == {message})
    if not alike and not re.match(rf"rank {rank}\b", message):
        message = f"rank {rank}: {message}"
    if _order(first)[0] == 1:
        # A peer's failure is first when the rank it blames died without a word: say how (SIGTERM
        # is torchrun's own, stopping the others).
        dead = [
            _died(r, f) for r, f in sorted(failures.items()) if _record(f) is None and f.exitcode != -signal.SIGTERM
        ]
        message += "".join(f"; {line}" for line in dead)
    return f"error: {message}", status
