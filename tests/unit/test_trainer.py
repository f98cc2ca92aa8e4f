"""End to end on the CPU: `tiny` trains, its loss falls, it stops and resumes exactly,
and bad input stops early without losing anything on disk."""

import json
import math
import os
import shutil
import signal

import pytest
import torch

from sparsetron.model.config import ConfigError
from sparsetron.train.checkpoint import CheckpointError
from sparsetron.train.config_io import load_job_config
from sparsetron.train.data import DataError
from sparsetron.train.schedule import lr_multiplier
from sparsetron.train.trainer import Trainer, TrainingDiverged

SMALL = [
    "data.max_documents=300",
    "data.seq_len=64",
    "trainer.micro_batch_size=4",
    "trainer.grad_accum_steps=2",
    "trainer.eval_batches=2",
    "trainer.eval_interval=6",
    "schedule.warmup_steps=2",
    "checkpoint.interval=4",
    "checkpoint.keep_last=0",
    "metrics.log_interval=2",
    "metrics.console=plain",
    "moe.bias_update_rate=0.01",  # tiny's balancing plus the bias, so its state must resume too
]


def tiny_job(run_dir, *overrides, steps=12):
    return load_job_config("tiny", [*SMALL, f"trainer.steps={steps}", f"trainer.run_dir={run_dir}", *overrides])


def checkpoint_steps(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_tiny_learns_and_writes_its_outputs(tmp_path):
    result = Trainer(tiny_job(tmp_path, "optimizer.lr=1e-2", steps=24)).run()
    assert result.step == 24 and result.tokens_seen == 24 * 2 * 4 * 64
    assert result.eval_losses[24] < 0.8 * result.eval_losses[0]
    assert all(math.isfinite(v) for v in result.losses.values())
    assert (tmp_path / "config.yaml").is_file()
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") >= 12
    assert any((tmp_path / "tensorboard").iterdir())
    assert checkpoint_steps(tmp_path) == [f"step_{s:08d}" for s in (4, 8, 12, 16, 20, 24)]


@pytest.mark.parametrize("extra", [[], ["parallel.activation_checkpointing=full"]], ids=["plain", "ac"])
def test_stop_and_resume_is_bitwise_exact(tmp_path, extra):
    straight = Trainer(tiny_job(tmp_path / "straight", *extra)).run()
    first = Trainer(tiny_job(tmp_path / "split", "trainer.stop_at=5", *extra)).run()
    assert first.stopped_early and first.step == 5
    resumed = Trainer(tiny_job(tmp_path / "split", *extra), resume="auto").run()
    assert resumed.step == 12
    split = {**first.losses, **resumed.losses}
    assert split == straight.losses  # bitwise: float equality of every step's loss
    assert resumed.eval_losses[12] == straight.eval_losses[12]


def status(run_dir):
    return json.loads((run_dir / "status.json").read_text())


def test_ctrl_c_and_the_time_limit_stop_with_a_save_and_say_so_in_status_json(tmp_path, monkeypatch):
    # A batch script requeues a run that status.json says is unfinished (launch/slurm.sbatch).
    train_step = Trainer.train_step

    def interrupted_at_step_3(self):
        result = train_step(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(Trainer, "train_step", interrupted_at_step_3)
    first = Trainer(tiny_job(tmp_path, steps=8)).run()
    assert (first.step, first.stopped_by) == (3, "signal SIGINT")
    assert status(tmp_path) == {"step": 3, "steps": 8, "finished": False, "stopped_by": "signal SIGINT"}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the run's handler is gone
    monkeypatch.undo()

    # A time limit already spent stops before the next step, as a signal would.
    limited = Trainer(tiny_job(tmp_path, "trainer.max_hours=1e-9", steps=8), resume="auto").run()
    assert (limited.step, limited.stopped_by, limited.losses) == (3, "trainer.max_hours", {})
    assert status(tmp_path)["stopped_by"] == "trainer.max_hours"

    finished = Trainer(tiny_job(tmp_path, steps=8), resume="auto").run()
    assert finished.step == 8 and not finished.stopped_early
    assert status(tmp_path) == {"step": 8, "steps": 8, "finished": True, "stopped_by": None}


def test_resume_from_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path):
    straight = Trainer(tiny_job(tmp_path)).run()
    middle = tmp_path / "checkpoints" / "step_00000008"
    again = Trainer(tiny_job(tmp_path), resume=str(middle)).run()
    assert again.losses == {s: v for s, v in straight.losses.items() if s > 8}
    names = checkpoint_steps(tmp_path)
    abandoned = [n for n in names if n.startswith("abandoned_")]
    assert len(abandoned) == 1 and abandoned[0].endswith("_step_00000012")
    assert [n for n in names if n.startswith("step_")] == [f"step_{s:08d}" for s in (4, 8, 12)]


def test_a_fresh_run_over_existing_checkpoints_is_refused(tmp_path):
    Trainer(tiny_job(tmp_path, "trainer.stop_at=4")).run()
    with pytest.raises(CheckpointError, match=r"already holds checkpoints \(newest: step_00000004\).*--resume auto"):
        Trainer(tiny_job(tmp_path))
    assert checkpoint_steps(tmp_path) == ["step_00000004"]


def test_resume_applies_changed_training_settings_and_lists_them(tmp_path, capsys):
    Trainer(tiny_job(tmp_path, "trainer.stop_at=4")).run()
    trainer = Trainer(tiny_job(tmp_path, "optimizer.lr=1e-4", "moe.aux_loss_coeff=0.02"), resume="auto")
    decayed = trainer.optimizer.param_groups[0]
    assert decayed["lr"] == pytest.approx(1e-4 * lr_multiplier(trainer.job.schedule, 4, 12))
    assert trainer.changed_settings == [
        "moe.aux_loss_coeff: 0.01 -> 0.02",
        "optimizer.lr: 0.003 -> 0.0001",
        "trainer.stop_at: 4 -> 0",
    ]
    trainer.run()
    out = capsys.readouterr().out
    assert "changed since the checkpoint: optimizer.lr: 0.003 -> 0.0001" in out


@pytest.mark.parametrize(
    "override, key",
    [("data.seq_len=32", "data.seq_len"), ("attention.n_kv_heads=4", "attention.n_kv_heads")],
)
def test_resume_refuses_what_the_checkpoint_fixes(tmp_path, override, key):
    Trainer(tiny_job(tmp_path, "trainer.stop_at=4")).run()
    with pytest.raises(ConfigError, match=rf"not loaded:\s+{key}: checkpoint"):
        Trainer(tiny_job(tmp_path, override), resume="auto")


def test_logged_lr_is_the_lr_each_step_used(tmp_path):
    job = tiny_job(tmp_path, "metrics.log_interval=1", steps=6)
    Trainer(job).run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["lr"] for r in records if "lr" in r}
    expected = {s: job.optimizer.lr * lr_multiplier(job.schedule, s - 1, 6) for s in range(1, 7)}
    assert logged == pytest.approx(expected)


def test_without_save_final_the_interval_still_saves_the_last_step(tmp_path):
    Trainer(tiny_job(tmp_path, "checkpoint.save_final=false", "trainer.stop_at=8")).run()
    assert checkpoint_steps(tmp_path) == ["step_00000004", "step_00000008"]


def test_half_written_checkpoint_is_ignored_and_refused(tmp_path):
    Trainer(tiny_job(tmp_path, "trainer.stop_at=4")).run()
    complete = tmp_path / "checkpoints" / "step_00000004"
    torn = tmp_path / "checkpoints" / "step_00000008"
    shutil.copytree(complete, torn)
    next(p for p in torn.iterdir() if p.name.startswith(".complete")).unlink()
    with pytest.raises(CheckpointError, match="step_00000008"):
        Trainer(tiny_job(tmp_path), resume=str(torn))
    resumed = Trainer(tiny_job(tmp_path, "trainer.stop_at=6"), resume="auto")
    assert resumed.step == 4
    assert torn.is_dir()  # nothing on disk is lost


def test_corrupt_checkpoint_names_the_file(tmp_path):
    Trainer(tiny_job(tmp_path, "trainer.stop_at=4")).run()
    folder = tmp_path / "checkpoints" / "step_00000004"
    metadata = folder / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=r"step_00000004.*\.metadata|\.metadata.*step_00000004"):
        Trainer(tiny_job(tmp_path), resume="auto")
    assert metadata.exists()


def test_checkpoint_of_another_model_is_refused_before_loading(tmp_path):
    Trainer(tiny_job(tmp_path, "trainer.stop_at=4")).run()
    with pytest.raises(ConfigError, match=r"different model[\s\S]*moe\.granularity: checkpoint 4, config 2"):
        Trainer(tiny_job(tmp_path, "moe.granularity=2"), resume="auto")
    assert checkpoint_steps(tmp_path) == ["step_00000004"]


def test_resume_path_that_does_not_exist(tmp_path):
    with pytest.raises(CheckpointError, match="nope"):
        Trainer(tiny_job(tmp_path), resume=str(tmp_path / "nope"))


def test_missing_data_path_names_it(tmp_path):
    missing = tmp_path / "absent.jsonl"
    with pytest.raises(DataError, match="absent.jsonl"):
        Trainer(tiny_job(tmp_path, "data.source=jsonl", f"data.paths=[{missing}]"))


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, monkeypatch):
    trainer = Trainer(tiny_job(tmp_path, "trainer.max_nonfinite_steps=3"))
    real_loss = trainer.runner._loss
    poisoned = {3, 6, 7, 8}  # optimizer steps whose loss is NaN

    def loss(*args):
        step = trainer.step + 1
        value = real_loss(*args)
        return value * float("nan") if step in poisoned and trainer.model.training else value

    monkeypatch.setattr(trainer.runner, "_loss", loss)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(TrainingDiverged, match=r"step 8: .*3 steps in a row"):
        trainer.run()
    assert trainer.skipped_steps == 4
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    # Diverged runs do not save: the last checkpoint is the good one at step 4.
    assert checkpoint_steps(tmp_path) == ["step_00000004"]


def test_async_saves_resume_bitwise_like_sync_ones(tmp_path):
    straight = Trainer(tiny_job(tmp_path / "sync", steps=8)).run()
    first = Trainer(tiny_job(tmp_path / "async", "checkpoint.async_save=true", "trainer.stop_at=5", steps=8)).run()
    # run() returns only once the background save is committed.
    assert first.step == 5 and (first.checkpoint / ".complete").is_file()
    resumed = Trainer(tiny_job(tmp_path / "async", "checkpoint.async_save=true", steps=8), resume="auto").run()
    assert {**first.losses, **resumed.losses} == straight.losses
    assert checkpoint_steps(tmp_path / "async") == ["step_00000004", "step_00000005", "step_00000008"]
    # The same tensor and train-state bytes as the synchronous save of the same step (config.yaml
    # names another run_dir, DCP's .metadata the folder's path and a save id).
    sums = [
        json.loads((tmp_path / run / "checkpoints/step_00000004/.complete").read_text())["checksums"]
        for run in ("sync", "async")
    ]
    for checksums in sums:
        del checksums["config.yaml"], checksums[".metadata"]
    assert sums[0] == sums[1] and len(sums[0]) == 2


def test_resume_auto_skips_a_corrupt_newest_checkpoint_says_so_and_sets_it_aside(tmp_path, capsys):
    Trainer(tiny_job(tmp_path, "trainer.stop_at=4")).run()
    newest = tmp_path / "checkpoints" / "step_00000008"
    shutil.copytree(tmp_path / "checkpoints" / "step_00000004", newest)  # verifies as it is
    data = bytearray((newest / "__0_0.distcp").read_bytes())
    data[len(data) // 3] ^= 0x01
    (newest / "__0_0.distcp").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"step_00000008 does not verify.*file __0_0\.distcp: checksum mismatch"):
        Trainer(tiny_job(tmp_path, "checkpoint.on_corrupt=error"), resume="auto")
    assert checkpoint_steps(tmp_path) == ["step_00000004", "step_00000008"]

    # stop_at=4: it resumes, reports and saves again without training.
    resumed = Trainer(tiny_job(tmp_path, "trainer.stop_at=4"), resume="auto").run()
    assert resumed.step == 4 and not resumed.losses
    out = capsys.readouterr().out
    assert "skipping a corrupt checkpoint" in out and "file __0_0.distcp: checksum mismatch" in out
    assert "resuming from step_00000004, the newest checkpoint that verifies" in out
    # Kept, bytes and all, under a name no lookup matches: keep_last never counts or prunes it.
    (aside,) = [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("abandoned_")]
    assert aside.name.endswith("_step_00000008") and (aside / "__0_0.distcp").read_bytes() == bytes(data)
    assert [n for n in checkpoint_steps(tmp_path) if n.startswith("step_")] == ["step_00000004"]
