"""How long a checkpoint save blocks the training loop: synchronous vs `checkpoint.async_save`.

One process, one model (a stack of square Linear layers with AdamW moments after one step,
--mb megabytes of parameters, so about three times that is saved), saved through
CheckpointManager into a scratch folder, alternating sync and async saves --reps times:

- sync save: `save()` from call to return (the loop is blocked for all of it);
- async blocked: `save()` from call to return (staging the state to CPU memory);
- async total: from the call until `wait()` returns (the folder committed).

Then the checksum's throughput: XXH3 over the last checkpoint's files (from the page cache),
as verifying a resume reads them.

    python benchmarks/checkpoint_save.py                   # ~150 MB of parameters, ~450 MB saved
    python benchmarks/checkpoint_save.py --mb 20 --reps 1  # a quick look
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from report import emit
from torch import nn

from sparsetron.train.checkpoint import CheckpointManager
from sparsetron.train.checkpoint.checksums import file_digest


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=150, help="megabytes of fp32 parameters")
    parser.add_argument("--width", type=int, default=2048, help="size of each square Linear layer")
    parser.add_argument("--reps", type=int, default=3, help="saves of each kind, alternating")
    parser.add_argument("--folder", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--output", default=None, help="also write the table to this file")
    return parser.parse_args(argv)


def build(mb: float, width: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    layers = max(1, round(mb * 2**20 / 4 / (width * width + width)))
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def measure(args: argparse.Namespace, folder: Path) -> str:
    model, opt = build(args.mb, args.width)
    saved_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) * 3 / 2**20
    managers = {
        "sync": CheckpointManager(folder / "sync", keep_last=1),
        "async": CheckpointManager(folder / "async", keep_last=1, async_save=True),
    }
    times: dict[str, list[float]] = {"sync": [], "async blocked": [], "async total": []}
    for step in range(1, args.reps + 1):
        for kind, manager in managers.items():
            start = time.perf_counter()
            manager.save(step, model, opt, {"step": step}, "benchmark: {}\n")
            blocked = time.perf_counter() - start
            manager.wait()
            total = time.perf_counter() - start
            if kind == "sync":
                times["sync"].append(total)
            else:
                times["async blocked"].append(blocked)
                times["async total"].append(total)
    sync, blocked, total = (statistics.median(times[k]) for k in ("sync", "async blocked", "async total"))

    files = [p for p in managers["sync"].latest().iterdir() if p.is_file()]
    nbytes = sum(p.stat().st_size for p in files)
    start = time.perf_counter()
    for file in files:
        file_digest(file)
    hash_s = time.perf_counter() - start

    lines = [
        f"checkpoint save, {saved_mb:.0f} MB saved (model + AdamW moments), median of {args.reps}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "",
        "| sync save s | async blocked s | async total s | blocked / sync |",
        "|---|---|---|---|",
        f"| {sync:.2f} | {blocked:.2f} | {total:.2f} | {blocked / sync:.2f} |",
        "",
        f"XXH3 checksum of the saved files (page cache): {nbytes / hash_s / 1e9:.2f} GB/s "
        f"({hash_s:.2f} s for {nbytes / 2**20:.0f} MB, {hash_s / sync:.0%} of the sync save)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    args = parse(argv)
    if args.folder:
        return emit(measure(args, Path(args.folder)), args.output)
    with tempfile.TemporaryDirectory(prefix="sparsetron-ckpt-bench-") as scratch:
        return emit(measure(args, Path(scratch)), args.output)


if __name__ == "__main__":
    main()
