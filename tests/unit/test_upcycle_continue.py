"""`sparsetron upcycle --continue`: the MoE continues the dense run where its checkpoint stopped
(step, learning rate, next batches, the dense function), and what cannot continue is refused."""

import json

import pytest
import torch

from sparsetron.launch.cli import main
from sparsetron.model.config import MoEConfig
from sparsetron.model.hf import save_hf
from sparsetron.train.checkpoint import CheckpointManager, list_complete
from sparsetron.train.config_io import load_job_config
from sparsetron.train.schedule import lr_multiplier
from sparsetron.train.trainer import Trainer
from sparsetron.train.upcycle import load_dense
from tests.unit.test_upcycle_cli import COMMON, moe_recipe

STEPS, STOP = 20, 7  # the dense run stops (as if preempted) at step 7 of a 20-step schedule


@pytest.fixture(scope="module")
def dense_stopped(tmp_path_factory):
    run = tmp_path_factory.mktemp("dense")
    sets = [*COMMON, f"trainer.run_dir={run}", f"trainer.steps={STEPS}", f"trainer.stop_at={STOP}"]
    Trainer(load_job_config("debug-dense", sets)).run()
    return run / "checkpoints" / f"step_{STOP:08d}"


def upcycle(source, recipe, out, *extra):
    sets = [arg for item in COMMON for arg in ("--set", item)]
    return main(["upcycle", "--from", str(source), "--recipe", recipe, "--out", str(out), *sets, *extra])


def test_continued_run_takes_the_dense_runs_step_lr_batches_and_function(tmp_path, dense_stopped, capsys):
    recipe = moe_recipe(tmp_path)
    out = tmp_path / "up"
    assert upcycle(dense_stopped, recipe, out, "--continue", "--set", f"trainer.steps={STEPS}") == 0
    assert [p.name for p in list_complete(out)] == [f"step_{STOP:08d}"]
    assert json.loads((out / "upcycle.json").read_text())["continued_from_step"] == STOP
    # The batch is pinned, so that `train --resume` refuses a layout that would change it.
    saved = CheckpointManager(out).read_config(out / f"step_{STOP:08d}")
    assert saved["trainer"]["global_batch_size"] == 4
    capsys.readouterr()

    # What the dense run would do next: resumed from its own checkpoint.
    dense_job = load_job_config("debug-dense", [*COMMON, f"trainer.run_dir={tmp_path / 'd'}", f"trainer.steps={STEPS}"])
    dense = Trainer(dense_job, resume=str(dense_stopped))
    moe_job = load_job_config(recipe, [*COMMON, f"trainer.run_dir={tmp_path / 'm'}", f"trainer.steps={STEPS}"])
    moe = Trainer(moe_job, resume=str(out))
    try:
        assert moe.step == dense.step == STOP
        peak = moe_job.optimizer.lr
        expected_lr = peak * lr_multiplier(moe_job.schedule, STOP, STEPS)
        assert expected_lr < peak  # past the warm-up: a restarted schedule would differ
        assert moe.scheduler.get_last_lr()[0] == pytest.approx(expected_lr, rel=1e-12)
        assert moe.tokens_seen == dense.tokens_seen == STOP * 4 * 64
        assert moe.optimizer.state == {}  # fresh: the dense moments belong to other parameters
        moe_batches, dense_batches = next(moe.loader), next(dense.loader)
        assert len(moe_batches) == len(dense_batches)
        for ours, theirs in zip(moe_batches, dense_batches, strict=True):
            assert torch.equal(ours.tokens, theirs.tokens)
        # The next batch is not the first one the dense run read: the data is fresh.
        assert dense.loader.state_dict()["index"] > 0

        # The MoE at the upcycle step computes the dense checkpoint's function.
        dense_model, _ = load_dense(dense_stopped)
        tokens = torch.randint(0, dense_model.model_cfg.vocab_size, (2, 24))
        with torch.no_grad():
            want, got = dense_model(tokens), moe.model(tokens)
        assert (got - want).norm() <= 1e-5 * want.norm()
    finally:
        moe.close()
        dense.close()


def test_what_cannot_continue_is_refused_by_name(tmp_path, dense_stopped, capsys):
    recipe = moe_recipe(tmp_path)
    fresh = tmp_path / "fresh"

    dense_model, _ = load_dense(dense_stopped)
    hf = save_hf(tmp_path / "hf", dense_model.model_cfg, dense_model.attn_cfg, MoEConfig(), dense_model.state_dict())
    assert upcycle(hf, recipe, fresh, "--continue") == 2
    assert "has no training step or data read position" in capsys.readouterr().err

    assert upcycle(dense_stopped, recipe, fresh, "--continue", "--set", "data.seq_len=32") == 2
    assert "data.seq_len: dense run 64, MoE recipe 32" in capsys.readouterr().err

    assert upcycle(dense_stopped, recipe, fresh, "--continue", "--set", "trainer.micro_batch_size=2") == 2
    assert "trainer.global_batch_size: the dense run trained 4 sequences per step, the MoE recipe 2" in (
        capsys.readouterr().err
    )

    assert upcycle(dense_stopped, recipe, fresh, "--continue", "--set", f"trainer.steps={STOP}") == 2
    assert "trainer.steps: the dense run is at step 7, the MoE recipe ends at step 7" in capsys.readouterr().err
    assert not fresh.exists()
