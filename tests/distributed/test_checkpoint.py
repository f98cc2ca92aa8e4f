"""Checkpoints on 2 gloo processes: verification split over the ranks, an async save across
ranks, and a rank failing inside a save failing every rank at once."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from harness import run_distributed
from torch import nn

from sparsetron.train.checkpoint import CheckpointError, CheckpointManager
from sparsetron.train.checkpoint import checksums as checkpoint_verify
from sparsetron.train.checkpoint import manager as ckpt
from sparsetron.train.checkpoint.checksums import share


def model_and_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    return model, opt


def verify_worker(folder: str) -> dict:
    rank = dist.get_rank()
    model, opt = model_and_optimizer()
    manager = CheckpointManager(folder, async_save=True)
    path = manager.save(1, model, opt, {"step": 1}, "trainer:\n  steps: 1\n")
    manager.wait()
    hashed: list[str] = []
    digest = checkpoint_verify.file_digest

    def recording(file, fsync=False):
        hashed.append(Path(file).name)
        return digest(file, fsync)

    checkpoint_verify.file_digest = recording
    assert manager.find_resume("auto").path == path
    clean = sorted(hashed)
    hashed.clear()

    marker = json.loads((path / ".complete").read_text())
    (victim,) = [name for name in share(marker["files"], 1, 2) if name.endswith(".distcp")]
    if rank == 0:  # corrupt a file that rank 1 hashes
        data = bytearray((path / victim).read_bytes())
        data[len(data) // 2] ^= 1
        (path / victim).write_bytes(bytes(data))
    dist.barrier()
    try:
        CheckpointManager(folder).find_resume(str(path))
        message = None
    except CheckpointError as err:
        message = str(err)
    return {
        "clean": clean,
        "after": sorted(hashed),
        "victim": victim,
        "message": message,
        "files": sorted(marker["files"]),
    }


def test_verification_is_split_over_ranks_and_catches_the_other_ranks_file(tmp_path):
    results = run_distributed(verify_worker, 2, str(tmp_path), timeout=120)
    files = results[0]["files"]
    assert "__0_0.distcp" in files and "__1_0.distcp" in files and "train_state_rank1.pt" in files
    # Every file hashed once, by one rank.
    assert sorted(results[0]["clean"] + results[1]["clean"]) == files
    assert results[0]["clean"] and results[1]["clean"]
    victim = results[0]["victim"]
    assert victim in results[1]["after"] and victim not in results[0]["after"]
    for result in results:  # rank 0 learns of the corruption rank 1 found
        assert f"file {victim}: checksum mismatch, corrupt (bytes changed at the same size)" in result["message"]
        assert "step_00000001" in result["message"]


def failing_save_worker(folder: str) -> list[dict]:
    """Rank 1 fails writing its train state (sync save), then hashing its files (async save, in the background)."""
    rank = dist.get_rank()
    model, opt = model_and_optimizer()
    write, digest_share = ckpt._write_bytes, ckpt.digest_share

    def failing_write(file, data):
        if file.name.startswith("train_state"):
            raise OSError("no space left on rank 1")
        write(file, data)

    def failing_digests(*args, **kwargs):
        raise OSError("no space left on rank 1")

    outcomes = []
    for async_save in (False, True):
        where = Path(folder) / f"async_{async_save}"
        manager = CheckpointManager(where, async_save=async_save)
        if rank == 1:
            ckpt._write_bytes = write if async_save else failing_write
            ckpt.digest_share = failing_digests if async_save else digest_share
        start = time.monotonic()
        try:
            manager.save(1, model, opt, {"step": 1}, "trainer:\n  steps: 1\n")
            manager.wait()
            message = None
        except CheckpointError as err:
            message = str(err)
        left = sorted(p.name for p in where.iterdir())
        outcomes.append({"message": message, "seconds": time.monotonic() - start, "left": left})
    return outcomes


def test_a_rank_failing_inside_save_fails_every_rank_promptly(tmp_path):
    # The harness's process-group timeout is 60 s: a rank left waiting at a barrier would take that long.
    results = run_distributed(failing_save_worker, 2, str(tmp_path), timeout=60)
    for rank, outcomes in enumerate(results):
        for outcome, where in zip(outcomes, ("writing the train state", "hashing the files"), strict=True):
            assert outcome["message"] is not None
            assert f"step_00000001 failed while {where}: rank 1: OSError: no space left on rank 1" in outcome["message"]
            assert "rank 0:" not in outcome["message"]
            assert outcome["seconds"] < 20
            if rank == 0:  # who removes the temporary folder before raising; no step folder either
                assert outcome["left"] == []
