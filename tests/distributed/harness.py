"""Run a function on N local processes joined by one gloo process group, as a test.

    from harness import run_distributed
    results = run_distributed(worker, 4, arg1, arg2, timeout=120)

`worker(*args)` runs on every rank after `init_process_group` (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, LOCAL_RANK, LOCAL_WORLD_SIZE are set, as torchrun would);
the list of its return values, indexed by rank, comes back. It must be a top-level
function (processes are spawned, not forked); one defined in a test file is found by the
file's path, whatever name pytest imported the file under.

A worker that raises fails the call with its traceback text; the others are stopped.
A run that outlives `timeout` seconds dumps every live worker's Python stack to stderr,
kills them and raises TimeoutError, so a deadlock fails the test instead of hanging it.
"""

from __future__ import annotations

import datetime
import faulthandler
import importlib
import importlib.util
import os
import pickle
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from slowdown import scaled


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(fn: Callable) -> tuple[str, str, str]:
    qualname = fn.__qualname__
    if "<" in qualname or "." in qualname:
        raise ValueError(f"run_distributed needs a top-level function, got {qualname} (spawned processes import it)")
    return fn.__module__, os.path.abspath(sys.modules[fn.__module__].__file__), qualname


def _resolve(module: str, path: str, qualname: str) -> Callable:
    try:
        return getattr(importlib.import_module(module), qualname)
    except (ImportError, AttributeError):
        pass
    # pytest's importlib mode gives test files names that a fresh process cannot import.
    name = f"_distributed_worker_{Path(path).stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return getattr(sys.modules[name], qualname)


def _entry(rank, ref, world_size, port, args, result_dir, backend, timeout):
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)  # N processes share a few cores
    fn = _resolve(*ref)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    try:
        result = fn(*args)
        # No rank tears its connections down while another still finishes a collective.
        dist.barrier()
    finally:
        # Also on an exception: a process left with live gloo threads aborts at exit
        # (SIGABRT), which would hide the worker's traceback from the test.
        dist.destroy_process_group()
    path = os.path.join(result_dir, f"{rank}.pkl")
    with open(path + ".part", "wb") as f:
        pickle.dump(result, f)
    os.replace(path + ".part", path)  # whole or absent: run_distributed trusts what exists


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 120, backend: str = "gloo") -> list:
    """Run `fn(*args)` on `world_size` spawned ranks; return each rank's result, by rank. `timeout`
    (also the ranks' collective time-out) is multiplied by SPARSETRON_TEST_TIMEOUT_SCALE."""
    timeout = scaled(timeout)
    ref = _reference(fn)
    with tempfile.TemporaryDirectory(prefix="sparsetron-dist-") as result_dir:
        context = mp.start_processes(
            _entry,
            args=(ref, world_size, free_port(), args, result_dir, backend, timeout),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        saved = [os.path.join(result_dir, f"{rank}.pkl") for rank in range(world_size)]
        try:
            # join raises (with the worker's traceback) as soon as any worker fails.
            while not context.join(timeout=max(0.0, deadline - time.monotonic()), grace_period=2):
                if time.monotonic() >= deadline:
                    alive = [rank for rank, p in enumerate(context.processes) if p.is_alive()]
                    for rank in alive:
                        if hasattr(signal, "SIGUSR1"):
                            os.kill(context.processes[rank].pid, signal.SIGUSR1)
                    time.sleep(1)  # let them print their stacks
                    raise TimeoutError(
                        f"{fn.__name__} on {world_size} processes ran past {timeout} s; "
                        f"ranks {alive} were still running (their stacks are on stderr)"
                    )
        except mp.ProcessExitedException as exc:
            # A signal after every rank finished, tore its group down and saved its result is
            # the interpreter's exit, not the test's: gloo threads have been seen to abort there
            # ("terminate called without an active exception", SIGABRT), rarely, under load.
            if not all(os.path.exists(path) for path in saved):
                raise
            print(f"harness: {exc} after every rank saved its result; results kept", file=sys.stderr)
        finally:
            for p in context.processes:
                if p.is_alive():
                    p.kill()
                p.join()
        results = []
        for path in saved:
            with open(path, "rb") as f:
                results.append(pickle.load(f))
        return results
