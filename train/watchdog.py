"""Telling a hung collective from a slow one, and naming who hangs.

A collective waits for every rank of its group; when one rank does not come (it sleeps, loops,
waits on a file system, or died), the others wait until the process group's timeout
(`parallel.step_timeout_s` during training) and then fail with an error that names neither the
collective nor the rank at fault. So every rank runs a heartbeat thread that, every
`interval` seconds, publishes to the job's key-value store (the one the process group was built
on, served apart from the collectives) what it is doing: the trainer's phase ("step 12",
"saving step 100") and, from torch's flight recorder, the last collective it entered on each
process group. When a collective fails, `diagnose` reads every rank's heartbeat and names the
collective (its kind, its number on its group, the group's ranks) and the ranks that never
entered it, with what they were doing.

gloo raises in the waiting rank's main thread at the timeout, where the trainer calls
`diagnose`. NCCL's own watchdog tears the process down at its timeout
(TORCH_NCCL_ASYNC_ERROR_HANDLING=3) with no Python exception, so on NCCL the heartbeat thread
itself watches this rank's oldest unfinished collective and prints the diagnosis when it has
waited `timeout` seconds; NCCL's timeout is set a few heartbeats later (`backend_timeout`).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

import torch.distributed as dist

KEY_PREFIX = "sparsetron/heartbeat/"
# A rank whose heartbeat is older than this many intervals has stopped reporting.
STALE_INTERVALS = 4


class CollectiveFailure(RuntimeError):
    """A collective did not complete on every rank; the message names it and the ranks at fault."""


def _flight_record(only_active: bool) -> dict[str, Any]:
    """torch's flight recorder of this process: its entries and the status of each process group."""
    import torch._C._distributed_c10d as c10d

    dump = getattr(c10d, "_dump_nccl_trace_json", None) or c10d._dump_fr_trace_json
    try:
        return json.loads(dump(True, only_active))
    except (RuntimeError, ValueError):
        return {}


def _group_names() -> dict[str, list[int]]:
    """Each process group's name (as the flight recorder calls it) and its global ranks."""
    names = dist.distributed_c10d._world.pg_names
    return {str(name): dist.get_process_group_ranks(group) for group, name in names.items()}


class Watchdog:
    """Publishes this rank's heartbeat; explains a failed collective from every rank's heartbeat."""

    def __init__(self, timeout: float, interval: float | None = None, self_detect: bool | None = None):
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.store = dist.distributed_c10d._get_default_store()
        self.timeout = timeout
        self.interval = interval if interval is not None else max(0.2, min(5.0, timeout / 10))
        backend = dist.get_backend()
        self.self_detect = backend == "nccl" if self_detect is None else self_detect
        self._phase = "start-up"
        self._phase_since = time.time()
        self._reported = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="sparsetron-heartbeat", daemon=True)
        self._publish()
        self._thread.start()

    @property
    def backend_timeout(self) -> float:
        """The process groups' own timeout: on NCCL a few heartbeats after this watchdog's, so the
        diagnosis is printed before NCCL's watchdog ends the process."""
        return self.timeout + (3 * self.interval if self.self_detect else 0.0)

    def phase(self, name: str) -> None:
        """What the main thread does from now on (read by the other ranks' diagnoses)."""
        self._phase, self._phase_since = name, time.time()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self.interval + 1)

    # ---- heartbeats --------------------------------------------------------------------

    def _heartbeat(self, record: dict[str, Any]) -> dict[str, Any]:
        return {
            "phase": self._phase,
            "phase_since": self._phase_since,
            "time": time.time(),
            "entered": {
                pg: status.get("last_enqueued_collective") for pg, status in record.get("pg_status", {}).items()
            },
        }

    def _publish(self, record: dict[str, Any] | None = None) -> None:
        record = _flight_record(only_active=True) if record is None else record
        self.store.set(f"{KEY_PREFIX}{self.rank}", json.dumps(self._heartbeat(record)))

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                record = _flight_record(only_active=True)
                self._publish(record)
                if self.self_detect and not self._reported:
                    self._detect(record)
            except Exception:  # noqa: BLE001 - the store is gone with rank 0: nothing left to report to
                return

    def _detect(self, record: dict[str, Any]) -> None:
        now = time.time_ns()
        for entry in record.get("entries", []):
            waited = (now - entry.get("time_created_ns", now)) / 1e9
            if waited >= self.timeout:
                self._reported = True
                print(f"error: {self.explain(entry, waited)}", file=sys.stderr, flush=True)
                return

    # ---- diagnosis ---------------------------------------------------------------------

    def _heartbeats(self, ranks: list[int]) -> dict[int, dict[str, Any] | None]:
        found: dict[int, dict[str, Any] | None] = {}
        for rank in ranks:
            key = f"{KEY_PREFIX}{rank}"
            try:
                found[rank] = json.loads(self.store.get(key)) if self.store.check([key]) else None
            except Exception:  # noqa: BLE001 - an unreachable store leaves the rank unexplained
                found[rank] = None
        return found

    def diagnose(self, error: BaseException) -> CollectiveFailure:
        """The error to raise for a collective that failed in this rank's main thread with `error`."""
        entries = _flight_record(only_active=False).get("entries", [])
        if not entries:
            return CollectiveFailure(f"rank {self.rank}, {self._phase}: a collective failed: {_first_line(error)}")
        last = max(entries, key=lambda entry: entry.get("record_id", 0))
        waited = (time.time_ns() - last.get("time_created_ns", time.time_ns())) / 1e9
        return CollectiveFailure(f"{self.explain(last, waited)} ({_first_line(error)})")

    def explain(self, entry: dict[str, Any], waited: float) -> str:
        """Which collective `entry` is, and which ranks of its group never entered it, and why."""
        group, _desc = (entry.get("process_group") or ["0", ""])[:2]
        seq = int(entry.get("collective_seq_id", 0))
        name = entry.get("profiling_name", "a collective")
        ranks = _group_names().get(str(group), list(range(self.world_size)))
        what = (
            f"rank {self.rank} ({self._phase}): collective {name} #{seq} of process group {group} "
            f"(ranks {', '.join(map(str, ranks))}) did not complete after {waited:.0f} s "
            f"(timeout {self.timeout:g} s)"
        )
        now = time.time()
        behind, silent = [], []
        for rank, beat in self._heartbeats([r for r in ranks if r != self.rank]).items():
            if beat is None:
                silent.append(f"rank {rank} never reported")
                continue
            age = now - beat["time"]
            entered = beat["entered"].get(str(group))
            doing = f"'{beat['phase']}' for {now - beat['phase_since']:.0f} s"
            if age > STALE_INTERVALS * self.interval:
                silent.append(
                    f"rank {rank} stopped reporting {age:.0f} s ago (dead, or stuck holding the GIL), in {doing}"
                )
            elif entered is None or int(entered) < seq:
                last = "none" if entered is None else f"#{entered}"
                behind.append(f"rank {rank} is in {doing}, its last collective on that group was {last}")
        if behind:
            what += f"; rank(s) {', '.join(b.split()[1] for b in behind)} did not reach it: " + "; ".join(behind)
        if silent:
            what += "; " + "; ".join(silent)
        if not behind and not silent:
            what += "; every rank of the group entered it (a slow or broken link, or a failure inside the collective)"
        return what


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
