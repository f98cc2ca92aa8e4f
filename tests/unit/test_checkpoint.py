"""CheckpointManager: atomic commit, resume lookup, exact round trips, clear failures, verified
checkpoints (sizes and checksums checked before loading) and asynchronous saves. The split of
the verification over ranks and a rank failing inside a save are in tests/distributed."""

from __future__ import annotations

import copy
import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_filesystem
import xxhash
from torch import nn

from sparsetron.train.checkpoint import CheckpointError, CheckpointManager, step_of
from sparsetron.train.checkpoint import manager as ckpt
from sparsetron.train.checkpoint.checksums import share
from sparsetron.train.checkpoint.disk_space import DiskFullError, checkpoint_bytes

MIB = 1 << 20
CONFIG_YAML = "model:\n  dim: 16\ntrainer:\n  steps: 10\n"


class Tiny(nn.Module):
    def __init__(self, hidden: int = 12):
        super().__init__()
        self.inp = nn.Linear(6, hidden)
        self.out = nn.Linear(hidden, 3, bias=False)
        self.register_buffer("scale", torch.rand(3))

    def forward(self, x):
        return self.out(torch.relu(self.inp(x))) * self.scale


def trained(seed: int = 0, steps: int = 3, hidden: int = 12):
    """A model and an AdamW whose moments are non-trivial after a few real steps."""
    torch.manual_seed(seed)
    model = Tiny(hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        train_step(model, opt)
    return model, opt


def train_step(model, opt):
    loss = model(torch.randn(5, 6)).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def fresh(seed: int = 99, hidden: int = 12):
    torch.manual_seed(seed)
    model = Tiny(hidden)
    return model, torch.optim.AdamW(model.parameters(), lr=5e-4)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a, b):
    """Bitwise equality of nested tensors / python values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def train_state_example(step: int):
    return {
        "step": step,
        "tokens_seen": step * 4096,
        "scheduler": {"last_epoch": step, "base_lrs": [1e-2]},
        "data": {"epoch": 1, "position": 1234},
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "counters": {"nonfinite_in_a_row": 0},
        "losses": torch.randn(4),
    }


def test_roundtrip_is_bitwise_and_training_continues_identically(tmp_path):
    model, opt = trained()
    state = train_state_example(3)
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=0)
    folder = manager.save(3, model, opt, state, CONFIG_YAML)
    assert folder.name == "step_00000003"
    assert (folder / ".complete").is_file() and (folder / "train_state_rank0.pt").is_file()
    assert json.loads((folder / ".complete").read_text())["step"] == 3

    model2, opt2 = fresh()
    assert not torch.equal(model2.inp.weight, model.inp.weight)
    loaded = manager.load(folder, model2, opt2)

    assert_same(snapshot(model), snapshot(model2))
    assert_same(opt.state_dict(), opt2.state_dict())
    assert_same(state, loaded)
    assert manager.read_config(folder) == {"model": {"dim": 16}, "trainer": {"steps": 10}}

    # Same data, same state -> the same next step, bit for bit.
    torch.manual_seed(7)
    loss_a = train_step(model, opt)
    torch.manual_seed(7)
    loss_b = train_step(model2, opt2)
    assert torch.equal(loss_a, loss_b)
    assert_same(snapshot(model), snapshot(model2))


def test_load_without_optimizer_reads_the_model_only(tmp_path):
    model, opt = trained()
    manager = CheckpointManager(tmp_path, keep_last=0)
    folder = manager.save(1, model, opt, {"step": 1}, CONFIG_YAML)
    model2, _ = fresh()
    assert manager.load(folder, model2) == {"step": 1}
    assert_same(snapshot(model), snapshot(model2))


def test_saving_before_the_first_step_leaves_the_optimizer_fresh(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = snapshot(model)
    manager = CheckpointManager(tmp_path, keep_last=0)
    folder = manager.save(0, model, opt, {"step": 0}, CONFIG_YAML)
    # get_state_dict initialises optimizer state by a zero step; that must not stick.
    assert not opt.state
    assert_same(before, snapshot(model))

    model2, opt2 = fresh()
    manager.load(folder, model2, opt2)
    assert not opt2.state
    torch.manual_seed(3)
    train_step(model, opt)
    torch.manual_seed(3)
    train_step(model2, opt2)
    assert_same(snapshot(model), snapshot(model2))


def test_shape_mismatch_names_key_and_leaves_model_untouched(tmp_path):
    model, opt = trained(hidden=12)
    manager = CheckpointManager(tmp_path, keep_last=0)
    folder = manager.save(2, model, opt, {"step": 2}, CONFIG_YAML)

    other, other_opt = fresh(hidden=20)
    before = snapshot(other)
    with pytest.raises(CheckpointError) as info:
        manager.load(folder, other, other_opt)
    message = str(info.value)
    assert str(folder) in message
    assert "does not fit the model" in message
    # Every mismatch is listed, not only the first one met.
    assert "model.inp.weight: checkpoint [12, 6] vs model [20, 6]" in message
    assert "model.out.weight: checkpoint [3, 12] vs model [3, 20]" in message
    assert_same(before, snapshot(other))
    assert not other_opt.state


def test_missing_and_unexpected_keys_are_named(tmp_path):
    model, opt = trained()
    manager = CheckpointManager(tmp_path, keep_last=0)
    folder = manager.save(2, model, opt, {"step": 2}, CONFIG_YAML)

    torch.manual_seed(1)
    bigger = Tiny()
    bigger.extra = nn.Linear(3, 3)
    before = snapshot(bigger)
    with pytest.raises(CheckpointError, match="missing from the checkpoint") as info:
        manager.load(folder, bigger)
    assert "model.extra.weight" in str(info.value)
    assert_same(before, snapshot(bigger))

    smaller = nn.Sequential()
    smaller.inp = nn.Linear(6, 12)
    with pytest.raises(CheckpointError, match="unexpected in the checkpoint") as info:
        manager.load(folder, smaller)
    assert "model.out.weight" in str(info.value)


def test_optimizer_state_is_keyed_by_parameter_name_whatever_the_groups(tmp_path):
    # Layouts split parameters into different AdamW groups (one per device mesh); a checkpoint
    # must load whatever the grouping.
    model, opt = trained()
    manager = CheckpointManager(tmp_path, keep_last=0)
    folder = manager.save(2, model, opt, {"step": 2}, CONFIG_YAML)
    other, _ = fresh()
    params = list(other.parameters())
    regrouped = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:2]}, {"params": params[2:]}], lr=0.1)
    manager.load(folder, other, regrouped)
    assert_same(snapshot(model), snapshot(other))
    for mine, theirs in zip(params, model.parameters(), strict=True):
        torch.testing.assert_close(regrouped.state[mine]["exp_avg"], opt.state[theirs]["exp_avg"], rtol=0, atol=0)


def test_older_format_is_refused_by_name(tmp_path):
    model, opt = trained()
    folder = CheckpointManager(tmp_path, keep_last=0).save(2, model, opt, {"step": 2}, CONFIG_YAML)
    marker = json.loads((folder / ".complete").read_text())
    (folder / ".complete").write_text(json.dumps({**marker, "format": 1}))
    with pytest.raises(CheckpointError, match="has format 1, this version reads format 2"):
        CheckpointManager(tmp_path).load(folder, *fresh())


def test_folder_without_marker_is_ignored_and_refused(tmp_path):
    model, opt = trained()
    manager = CheckpointManager(tmp_path, keep_last=0)
    first = manager.save(1, model, opt, {"step": 1}, CONFIG_YAML)
    second = manager.save(2, model, opt, {"step": 2}, CONFIG_YAML)
    assert manager.latest() == second
    (second / ".complete").unlink()

    assert manager.list_complete() == [first]
    assert manager.latest() == first
    assert manager.resolve("auto") == first
    with pytest.raises(CheckpointError, match="lacks the .complete marker") as info:
        manager.resolve(str(second))
    assert str(second) in str(info.value) and "half-written" in str(info.value)
    with pytest.raises(CheckpointError, match="half-written"):
        manager.load(second, *fresh())


def test_resolve_paths(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=0)
    assert manager.resolve("auto") is None
    assert manager.resolve("none") is None
    model, opt = trained()
    saved = manager.save(4, model, opt, {"step": 4}, CONFIG_YAML)

    assert manager.resolve(str(saved)) == saved
    assert manager.resolve(str(tmp_path / "ckpt")) == saved  # the parent: its newest
    monkeypatch.chdir(tmp_path)
    assert manager.resolve("step_00000004") == tmp_path / "ckpt" / "step_00000004"

    with pytest.raises(CheckpointError, match="does not exist") as info:
        manager.resolve(str(tmp_path / "nowhere"))
    assert "nowhere" in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is not a step folder"):
        manager.resolve(str(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match="not a step folder"):
        manager.resolve(str(saved / "config.yaml"))


@pytest.mark.parametrize("where", ["_write_marker", "_commit"])
def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch, where):
    model, opt = trained()
    manager = CheckpointManager(tmp_path, keep_last=1)
    first = manager.save(1, model, opt, {"step": 1}, CONFIG_YAML)
    expected = snapshot(model)

    train_step(model, opt)

    def crash(*args, **kwargs):
        raise OSError("disk pulled out")

    # Both points come after DCP has written the tensors into the temporary folder.
    monkeypatch.setattr(ckpt, where, crash)
    with pytest.raises(
        CheckpointError, match="step_00000002 failed while committing it: rank 0: OSError: disk pulled out"
    ):
        manager.save(2, model, opt, {"step": 2}, CONFIG_YAML)
    monkeypatch.undo()

    assert not (tmp_path / "step_00000002").exists()
    assert manager.list_complete() == [first]
    model2, opt2 = fresh()
    assert manager.load(manager.resolve("auto"), model2, opt2) == {"step": 1}
    assert_same(expected, snapshot(model2))


def test_keep_last_deletes_only_oldest_complete(tmp_path):
    model, opt = trained()
    stranger = tmp_path / "step_00000000"
    stranger.mkdir(parents=True)
    (stranger / "notes.txt").write_text("someone else's")
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        manager.save(step, model, opt, {"step": step}, CONFIG_YAML)
    assert [p.name for p in manager.list_complete()] == ["step_00000003", "step_00000004"]
    assert (stranger / "notes.txt").read_text() == "someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000000", "step_00000003", "step_00000004"]

    keep_all = CheckpointManager(tmp_path, keep_last=0)
    keep_all.save(5, model, opt, {"step": 5}, CONFIG_YAML)
    assert len(keep_all.list_complete()) == 3


def test_resaving_a_step_replaces_it(tmp_path):
    model, opt = trained()
    manager = CheckpointManager(tmp_path, keep_last=0)
    manager.save(5, model, opt, {"step": 5, "which": "first"}, CONFIG_YAML)
    train_step(model, opt)
    folder = manager.save(5, model, opt, {"step": 5, "which": "second"}, CONFIG_YAML)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000005"]
    model2, opt2 = fresh()
    assert manager.load(folder, model2, opt2)["which"] == "second"
    assert_same(snapshot(model), snapshot(model2))


def test_interrupted_replacement_is_recovered(tmp_path):
    model, opt = trained()
    manager = CheckpointManager(tmp_path, keep_last=0)
    folder = manager.save(5, model, opt, {"step": 5}, CONFIG_YAML)
    # What a kill between "move the old copy aside" and "rename the new one in" leaves.
    folder.rename(tmp_path / ".replaced_step_00000005")
    assert CheckpointManager(tmp_path).latest() == folder
    model2, _ = fresh()
    CheckpointManager(tmp_path).load(folder, model2)
    assert_same(snapshot(model), snapshot(model2))


def test_saving_over_an_unmarked_folder_moves_it_aside(tmp_path):
    model, opt = trained()
    stale = tmp_path / "step_00000007"
    stale.mkdir()
    (stale / "partial.distcp").write_bytes(b"half")
    manager = CheckpointManager(tmp_path, keep_last=0)
    with pytest.warns(UserWarning, match="moved it to"):
        folder = manager.save(7, model, opt, {"step": 7}, CONFIG_YAML)
    assert manager.list_complete() == [folder]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(".incomplete_step_00000007")]
    assert len(aside) == 1 and (aside[0] / "partial.distcp").read_bytes() == b"half"


def _corrupt(file, truncate: bool):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if truncate else bytes(len(data)))


@pytest.mark.parametrize("truncate", [True, False], ids=["truncated", "overwritten"])
@pytest.mark.parametrize("name", ["train_state_rank0.pt", ".metadata"])
def test_corrupt_files_are_named(tmp_path, name, truncate):
    model, opt = trained()
    manager = CheckpointManager(tmp_path, keep_last=0)
    folder = manager.save(3, model, opt, {"step": 3}, CONFIG_YAML)
    _corrupt(folder / name, truncate)

    model2, opt2 = fresh()
    before = snapshot(model2)
    with pytest.raises(CheckpointError) as info:
        manager.load(folder, model2, opt2)
    assert name in str(info.value) and str(folder) in str(info.value)
    assert_same(before, snapshot(model2))


@pytest.mark.parametrize("truncate", [True, False], ids=["truncated", "overwritten"])
def test_corrupt_tensor_data_is_reported(tmp_path, truncate):
    model, opt = trained()
    manager = CheckpointManager(tmp_path, keep_last=0)
    folder = manager.save(3, model, opt, {"step": 3}, CONFIG_YAML)
    (data_file,) = folder.glob("*.distcp")
    _corrupt(data_file, truncate)
    model2, opt2 = fresh()
    before = snapshot(model2)
    with pytest.raises(CheckpointError, match="distcp") as info:
        manager.load(folder, model2, opt2)
    assert str(folder) in str(info.value)
    if truncate:
        # Caught by the sizes recorded at commit, before any tensor is read.
        assert f"{data_file.name} has" in str(info.value)
        assert_same(before, snapshot(model2))


# ---- verified checkpoints -------------------------------------------------------------


def listing(folder: Path) -> dict[str, int]:
    """Every path below `folder` with its size: what 'nothing changed on disk' compares."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))}


def two_checkpoints(folder: Path, **options):
    model, opt = trained()
    manager = CheckpointManager(folder, keep_last=0, **options)
    older = manager.save(1, model, opt, {"step": 1}, CONFIG_YAML)
    older_state = snapshot(model)
    train_step(model, opt)
    newer = manager.save(2, model, opt, {"step": 2}, CONFIG_YAML)
    return manager, older, older_state, newer


def flip_a_bit(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x10
    file.write_bytes(bytes(data))


def truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def edit_config(file: Path) -> None:
    file.write_text(file.read_text().replace("steps: 10", "steps: 99"))


DAMAGE = {
    # (what to do to which file, what the message must say)
    "truncated_distcp": (truncate, "__0_0.distcp", r"has \d+ bytes but \d+ were saved \(truncated"),
    "bit_flipped_distcp": (
        flip_a_bit,
        "__0_0.distcp",
        r"checksum mismatch, corrupt \(bytes changed at the same size\)",
    ),
    "edited_config": (edit_config, "config.yaml", r"checksum mismatch"),
}


def test_the_marker_holds_every_files_size_and_checksum(tmp_path):
    model, opt = trained()
    folder = CheckpointManager(tmp_path).save(1, model, opt, {"step": 1}, CONFIG_YAML)
    marker = json.loads((folder / ".complete").read_text())
    files = sorted(p.name for p in folder.iterdir() if p.name != ".complete")
    assert sorted(marker["files"]) == files == sorted(marker["checksums"])
    assert marker["checksum"] == "xxh3_64"
    for name in files:
        data = (folder / name).read_bytes()
        assert marker["files"][name] == len(data)
        assert marker["checksums"][name] == xxhash.xxh3_64(data).hexdigest()


@pytest.mark.parametrize("damage", DAMAGE)
def test_auto_falls_back_from_a_corrupt_checkpoint_and_says_so(tmp_path, damage):
    corrupt, name, reason = DAMAGE[damage]
    manager, older, older_state, newer = two_checkpoints(tmp_path)
    corrupt(newer / name)
    before = listing(tmp_path)

    point = manager.find_resume("auto")
    assert point.path == older
    said = "\n".join(point.messages)
    assert f"skipping a corrupt checkpoint: checkpoint {newer} does not verify" in said
    assert f"file {name}" in said
    assert re.search(reason, said)
    assert f"resuming from {older.name}" in said
    model, opt = fresh()
    assert manager.load(point.path, model, opt) == {"step": 1}
    assert_same(older_state, snapshot(model))

    # Named explicitly, the corrupt one is refused whatever on_corrupt says.
    with pytest.raises(CheckpointError, match=f"file {name}") as info:
        manager.find_resume(str(newer))
    assert str(newer) in str(info.value)
    strict = CheckpointManager(tmp_path, on_corrupt="error")
    with pytest.raises(CheckpointError, match="on_corrupt=error: not falling back") as info:
        strict.find_resume("auto")
    assert f"file {name}" in str(info.value)
    model, opt = fresh()
    untouched = snapshot(model)
    with pytest.raises(CheckpointError, match=f"file {name}"):
        CheckpointManager(tmp_path).load(newer, model, opt)
    assert_same(untouched, snapshot(model))
    assert listing(tmp_path) == before  # nothing deleted, renamed or written


def test_every_checkpoint_corrupt_is_refused(tmp_path):
    manager, older, _, newer = two_checkpoints(tmp_path)
    flip_a_bit(older / "__0_0.distcp")
    truncate(newer / "train_state_rank0.pt")
    with pytest.raises(CheckpointError, match="no complete checkpoint in .* verifies") as info:
        manager.find_resume("auto")
    assert "step_00000001" in str(info.value) and "step_00000002" in str(info.value)


def test_a_marker_without_checksums_is_checked_by_size_and_says_so(tmp_path):
    manager, _, _, newer = two_checkpoints(tmp_path)
    marker_file = newer / ".complete"
    marker = json.loads(marker_file.read_text())
    del marker["checksum"], marker["checksums"]
    marker_file.write_text(json.dumps(marker))

    point = manager.find_resume("auto")
    assert point.path == newer
    assert point.messages == [
        f"checkpoint {newer} records no checksums (written before sparsetron recorded them): "
        "only its file sizes were verified"
    ]
    truncate(newer / "__0_0.distcp")
    with pytest.raises(CheckpointError, match="__0_0.distcp has"):
        manager.find_resume(str(newer))


def test_the_split_over_ranks_covers_every_file_once():
    sizes = {"a": 50, "b": 40, "c": 30, "d": 20, ".metadata": 5, "e": 0}
    parts = [share(sizes, rank, 3) for rank in range(3)]
    assert sorted(n for part in parts for n in part) == sorted(sizes)
    # Largest first, each to the least-loaded rank: 50 | 40+5+0 | 30+20.
    assert parts == [["a"], ["b", ".metadata", "e"], ["c", "d"]]
    assert share(sizes, 0, 1) == sorted(sizes, key=lambda n: -sizes[n])


def test_async_save_holds_the_state_of_the_moment_it_returned(tmp_path):
    model, opt = trained()
    manager = CheckpointManager(tmp_path, async_save=True)
    expected_model, expected_opt = snapshot(model), copy.deepcopy(opt.state_dict())
    folder = manager.save(3, model, opt, {"step": 3}, CONFIG_YAML)
    for _ in range(3):  # training goes on while the save writes
        train_step(model, opt)
    assert manager.wait() == folder
    assert manager.wait() is None
    assert (folder / ".complete").is_file()
    model2, opt2 = fresh()
    assert manager.load(folder, model2, opt2) == {"step": 3}
    assert_same(expected_model, snapshot(model2))
    assert_same(expected_opt, opt2.state_dict())


def test_an_async_save_that_fails_raises_at_the_next_save_naming_it(tmp_path, monkeypatch):
    model, opt = trained()
    manager = CheckpointManager(tmp_path, async_save=True)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "digest_share", broken)
    manager.save(1, model, opt, {"step": 1}, CONFIG_YAML)
    with pytest.raises(
        CheckpointError, match=r"step_00000001 failed while hashing the files: rank 0: OSError: disk full"
    ):
        manager.save(2, model, opt, {"step": 2}, CONFIG_YAML)
    assert manager.list_complete() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # its temporary folder is gone too


def saver_model() -> nn.Module:
    # About 3 MB of weights and AdamW moments: a save takes tens of milliseconds.
    return nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 256))


SAVING_FOREVER = textwrap.dedent(
    """
    import os
    import sys

    import torch
    from sparsetron.train.checkpoint import CheckpointManager
    from test_checkpoint import saver_model

    # Imports once, then forks a saver for every line "FOLDER STEP" read, waits for the test to
    # kill it (SIGKILL) and says so: a kill costs a fork, not a Python start. One thread, and no
    # tensor math before the fork; an optimizer is built once for the imports it makes.
    torch.set_num_threads(1)
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    for line in sys.stdin:
        folder, step = line.split()
        step = int(step)
        pid = os.fork()
        if pid == 0:
            model = saver_model()
            opt = torch.optim.AdamW(model.parameters())
            manager = CheckpointManager(folder, keep_last=2, async_save=True)
            print("ready", os.getpid(), flush=True)
            while True:  # back to back: the process is almost always inside a save
                step += 1
                model(torch.randn(8, 256)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
                manager.save(step, model, opt, {"step": step}, "trainer:\\n  steps: 1\\n")
        os.waitpid(pid, 0)
        print("reaped", flush=True)
    """
)


def test_kill_9_during_async_saves_never_leaves_a_checkpoint_auto_picks_and_cannot_load(tmp_path):
    rng = random.Random(0)
    folder = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    forker = subprocess.Popen(
        [sys.executable, "-c", SAVING_FOREVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
    )
    loaded = 0
    try:
        for kill in range(8):
            forker.stdin.write(f"{folder} {kill * 1000}\n")
            forker.stdin.flush()
            word, pid = forker.stdout.readline().split()
            assert word == "ready"
            time.sleep(rng.uniform(0.02, 0.5))
            os.kill(int(pid), signal.SIGKILL)
            assert forker.stdout.readline() == "reaped\n"
            # What `--resume auto` does next: recover, pick, verify, load; on_corrupt=error so
            # that picking a broken folder fails instead of falling back.
            manager = CheckpointManager(folder, on_corrupt="error")
            path = manager.resolve("auto")
            if path is not None:
                model = saver_model()
                assert manager.load(path, model, torch.optim.AdamW(model.parameters()))["step"] == step_of(path)
                loaded += 1
    finally:
        forker.kill()
        forker.wait()
    assert loaded >= 1
    # The kills did land inside saves: their temporary folders are left (and never picked).
    assert any(p.name.startswith(".tmp_step_") for p in folder.iterdir())


# ---- a full disk (the run-level checks are in test_disk_space.py) ----------------------------


def failing_write(error: BaseException):
    def write_item(*args, **kwargs):
        raise error

    return write_item


@pytest.mark.parametrize(
    "error, free, async_save, cause",
    [
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), None, False, "disk full"),
        (OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), None, True, "disk quota exceeded"),
        # torch's zip writer after a short write; the errno is lost, the disk is left full.
        (
            RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
            MIB,
            False,
            "disk full",
        ),
        # The same message with plenty of space is some other failure: reported as it is.
        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"), 1 << 40, False, None),
    ],
    ids=["ENOSPC", "EDQUOT-async", "zip-writer-full", "zip-writer-not-full"],
)
def test_a_write_that_runs_out_of_space_is_one_line_and_keeps_the_previous_checkpoint(
    tmp_path, monkeypatch, error, free, async_save, cause
):
    model, opt = trained(seed=int.from_bytes(os.urandom(2), "little"))
    manager = CheckpointManager(tmp_path, keep_last=1, async_save=async_save)
    first = manager.save(1, model, opt, {"step": 1}, CONFIG_YAML)
    manager.wait()
    expected = snapshot(model)
    train_step(model, opt)

    monkeypatch.setattr(dcp_filesystem, "_write_item", failing_write(error))
    if free is not None:
        monkeypatch.setattr(ckpt, "free_bytes", lambda folder: free)
    with pytest.raises(CheckpointError) as raised:
        manager.save(2, model, opt, {"step": 2}, CONFIG_YAML)
        manager.wait()
    monkeypatch.undo()

    message = str(raised.value)
    if cause is None:
        assert not isinstance(raised.value, DiskFullError)
        assert "unexpected pos" in message
    else:
        assert isinstance(raised.value, DiskFullError)
        assert message == (
            f"{cause} at {tmp_path}; step_00000002 was not saved and its partial files are removed; "
            "the newest checkpoint, step_00000001, is intact (free space, then --resume auto)"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]
    model2, opt2 = fresh()
    assert manager.load(manager.resolve("auto"), model2, opt2) == {"step": 1}
    assert manager.resolve("auto") == first
    assert_same(expected, snapshot(model2))


@pytest.fixture
def small_tmpfs(tmp_path):
    """An 8 MiB tmpfs: a real filesystem that fills up (needs root allowed to mount, not every container)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_real_full_disk(small_tmpfs):
    folder = small_tmpfs / "checkpoints"
    torch.manual_seed(int.from_bytes(os.urandom(2), "little"))
    model = saver_model()  # about 3 MB of weights and AdamW moments
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step_2d(model, opt)
    params = sum(p.numel() for p in model.parameters())

    # Measured on the real filesystem: 8 MiB cannot hold the estimate (3 MB + the margin).
    with pytest.raises(DiskFullError, match=rf"^checkpoint\.folder {folder} has [\d.]+ MiB free, a checkpoint needs"):
        CheckpointManager(folder).require_space(checkpoint_bytes(params))

    manager = CheckpointManager(folder)  # size unknown: no check before saving, as a racing writer would defeat it
    first = manager.save(1, model, opt, {"step": 1}, CONFIG_YAML)
    expected = snapshot(model)
    train_step_2d(model, opt)
    filler = small_tmpfs / "filler"
    filler.write_bytes(bytes(shutil.disk_usage(small_tmpfs).free - MIB))
    with pytest.raises(DiskFullError) as raised:
        manager.save(2, model, opt, {"step": 2}, CONFIG_YAML)
    assert str(raised.value) == (
        f"disk full at {folder}; step_00000002 was not saved and its partial files are removed; "
        "the newest checkpoint, step_00000001, is intact (free space, then --resume auto)"
    )
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000001"]
    filler.unlink()
    restored = saver_model()
    assert manager.load(first, restored, torch.optim.AdamW(restored.parameters(), lr=1e-3)) == {"step": 1}
    assert_same(expected, snapshot(restored))


def train_step_2d(model, opt):
    model(torch.randn(4, 256)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
