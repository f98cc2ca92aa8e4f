"""What `sparsetron train` exits with when it is interrupted or runs out of memory (the table in
launch/cli.py), run in-process; the signals are sent from inside a training step."""

import json
import os
import random
import signal

import pytest
import torch
import torch.distributed.checkpoint as dcp

from sparsetron.launch.cli import finished_status, main
from sparsetron.model.config import ConfigError
from sparsetron.parallel.memory import MemoryPlan
from sparsetron.train import memory_fit
from sparsetron.train.checkpoint import list_complete, step_of
from sparsetron.train.trainer import Trainer

TRAIN_STEP, SAVE = Trainer.train_step, Trainer.save


def _train(run_dir, *settings: str, force: bool = False) -> list[str]:
    args = ["train", "debug-dense", "--set", f"trainer.run_dir={run_dir}", "--set", "metrics.console=plain"]
    small = ("data.seq_len=32", "trainer.micro_batch_size=2", "trainer.eval_batches=1", "trainer.eval_interval=0")
    for setting in ("trainer.steps=8", *small, "metrics.tensorboard=false", *settings):
        args += ["--set", setting]
    return [*args, "--force"] if force else args


def _signal_after_step(monkeypatch, step: int) -> None:
    """Ctrl-C at the end of training step `step`, as a terminal delivers it (to this process)."""

    def interrupted(self):
        result = TRAIN_STEP(self)
        if self.step == step:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(Trainer, "train_step", interrupted)


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def test_ctrl_c_saves_and_exits_130_and_a_second_one_during_the_save_keeps_the_earlier_checkpoints(
    tmp_path, monkeypatch, capsys
):
    stop = random.randint(1, 2)
    _signal_after_step(monkeypatch, stop)
    assert main(_train(tmp_path / "once", "checkpoint.interval=0")) == 130
    out, err = capsys.readouterr()
    assert [step_of(p) for p in list_complete(tmp_path / "once" / "checkpoints")] == [stop]
    assert f"stopped at step {stop} (signal SIGINT); resume with --resume auto" in out
    assert json.loads((tmp_path / "once" / "status.json").read_text())["stopped_by"] == "signal SIGINT"
    assert not _error_lines(err)

    # After a save at step 2, Ctrl-C after step 3, and again while DCP writes the tensor data of
    # the stop's save.
    _signal_after_step(monkeypatch, 3)
    write_data = dcp.FileSystemWriter.write_data

    def interrupted_write(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return write_data(self, *args, **kwargs)

    def save_interrupted_when_stopping(self):
        if self._stop_requested:
            monkeypatch.setattr(dcp.FileSystemWriter, "write_data", interrupted_write)
        return SAVE(self)

    monkeypatch.setattr(Trainer, "save", save_interrupted_when_stopping)
    checkpoints = tmp_path / "twice" / "checkpoints"
    assert main(_train(tmp_path / "twice", "checkpoint.interval=2")) == 130
    out, err = capsys.readouterr()
    assert err.splitlines()[-1] == "interrupted: stopped without saving; earlier checkpoints are intact"
    assert not _error_lines(err)
    assert [step_of(p) for p in list_complete(checkpoints)] == [2]
    assert [p.name for p in checkpoints.iterdir()] == ["step_00000002"]  # no leftovers


@pytest.mark.parametrize("torchrun", [False, True], ids=["alone", "torchrun"])
def test_a_stop_that_saved_exits_0_unless_a_signal_ended_the_process(monkeypatch, torchrun):
    if torchrun:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    else:
        monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    for resumable in (None, "trainer.stop_at", "trainer.max_hours", "signal SIGUSR1", "another rank's stop request"):
        assert finished_status(resumable) == 0
    # Under torchrun a rank's non-zero status would make torchrun restart the group.
    assert finished_status("signal SIGINT") == (0 if torchrun else 130)
    assert finished_status("signal SIGTERM") == (0 if torchrun else 143)


def test_an_out_of_memory_step_is_one_line_with_the_plan_and_status_1(tmp_path, monkeypatch, capsys):
    failing = random.randint(1, 4)

    def out_of_memory(self):
        if self.step + 1 == failing:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity")
        return TRAIN_STEP(self)

    monkeypatch.setattr(Trainer, "train_step", out_of_memory)
    assert main(_train(tmp_path)) == 1
    err = capsys.readouterr().err
    [line] = _error_lines(err)
    assert line.startswith(
        f"error: out of memory on cpu in step {failing} (CUDA out of memory. Tried to allocate 2.00 GiB); "
        "memory per rank: parameters "
    )
    assert "trainer.micro_batch_size" in line and "parallel.activation_checkpointing=full" in line
    assert "Traceback" not in err


def _meminfo(tmp_path, monkeypatch, available: int) -> None:
    """The node's memory as /proc/meminfo would report it, in kB."""
    fake = tmp_path / "meminfo"
    fake.write_text(f"MemTotal:       {4 * available} kB\nMemFree:  1 kB\nMemAvailable:   {available} kB\n")
    monkeypatch.setattr(memory_fit, "MEMINFO", fake)


def test_a_memory_plan_larger_than_the_node_is_refused_unless_forced(tmp_path, monkeypatch, capsys):
    # debug-dense plans over 2 MiB per rank (parameters and AdamW states alone); the node has
    # less for each of its local ranks.
    ranks = random.randint(1, 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    _meminfo(tmp_path, monkeypatch, ranks * random.randint(256, 2000))
    assert main(_train(tmp_path / "refused")) == 2
    err = capsys.readouterr().err
    [line] = _error_lines(err)
    assert line.startswith("error: memory per rank: parameters ") and "more than this node has " in line
    assert (f"for each of its {ranks} ranks" in line) == (ranks > 1)
    assert "trainer.micro_batch_size" in line and line.endswith("start anyway with `sparsetron train --force`")
    assert not (tmp_path / "refused").exists()  # refused before anything was written

    assert main(_train(tmp_path / "forced", "trainer.stop_at=1", "checkpoint.save_final=false", force=True)) == 0
    err = capsys.readouterr().err
    assert not _error_lines(err)
    [warning] = [line for line in err.splitlines() if line.startswith("warning: memory per rank: ")]
    assert warning.endswith("(starting anyway: --force)")


def test_the_plan_is_held_against_free_memory_per_local_rank(tmp_path, monkeypatch):
    plan = MemoryPlan(1, *(random.randint(1, 1 << 30) for _ in range(4)))
    ranks = random.randint(1, 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    cpu = torch.device("cpu")
    _meminfo(tmp_path, monkeypatch, -(-plan.total_bytes * ranks // 1024))  # just enough for each rank
    assert memory_fit.check_plan_fits(plan, cpu, force=False) is None
    _meminfo(tmp_path, monkeypatch, plan.total_bytes * ranks // 1024 - ranks)  # a little short
    with pytest.raises(ConfigError, match="more than this node has"):
        memory_fit.check_plan_fits(plan, cpu, force=False)
    assert memory_fit.check_plan_fits(plan, cpu, force=True).endswith("(starting anyway: --force)")
    monkeypatch.setattr(memory_fit, "MEMINFO", tmp_path / "absent")
    assert memory_fit.check_plan_fits(plan, cpu, force=False) is None  # unmeasured: not refused


def test_what_counts_as_out_of_memory():
    assert memory_fit.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory."))
    assert memory_fit.is_out_of_memory(MemoryError())
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: ...")
    assert memory_fit.is_out_of_memory(cpu)
    assert not memory_fit.is_out_of_memory(RuntimeError("shape mismatch"))
