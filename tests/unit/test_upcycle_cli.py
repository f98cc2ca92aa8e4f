"""`sparsetron upcycle` end to end on the CPU: train the dense debug recipe, upcycle it, and
continue training the MoE from the upcycled checkpoint; plus the command's refusals."""

import json
import math

import pytest
import torch
import yaml

from sparsetron.launch.cli import main
from sparsetron.model.config import MoEConfig
from sparsetron.model.hf import save_hf
from sparsetron.model.transformer import Transformer
from sparsetron.train.checkpoint import CheckpointManager, list_complete
from sparsetron.train.config_io import load_job_config, resolve_recipe
from sparsetron.train.trainer import Trainer
from sparsetron.train.upcycle import load_dense, upcycle_checkpoint

COMMON = [
    "data.max_documents=120",
    "trainer.micro_batch_size=4",
    "trainer.eval_batches=2",
    "metrics.console=none",
    "metrics.tensorboard=false",
    "checkpoint.keep_last=0",
]
MOE = {
    "num_experts": 4,
    "top_k": 1,
    "granularity": 4,  # 16 experts of 48 units (the dense FFN has 192), 4 per token
    "route_order": "topk_then_softmax",
    "n_shared_experts": 1,
    "first_k_dense": 1,
    "aux_loss_coeff": 0.01,
}


def moe_recipe(tmp_path, **moe):
    """The dense debug recipe with an MoE section (same model, attention and data)."""
    raw = yaml.safe_load(resolve_recipe("debug-dense").read_text())
    raw["moe"] = {**MOE, **moe}
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("dense")
    job = load_job_config("debug-dense", [*COMMON, f"trainer.run_dir={run}", "trainer.steps=20"])
    return run, Trainer(job).run()


@pytest.mark.slow
@pytest.mark.parametrize("order", ["topk_then_softmax", "softmax_then_topk"])
def test_upcycle_then_train_continues_from_the_dense_loss(tmp_path, dense_run, capsys, order):
    run, dense = dense_run
    recipe = moe_recipe(tmp_path, route_order=order)
    out = tmp_path / "upcycled"
    sets = [arg for item in COMMON for arg in ("--set", item)]  # as `train` will get them
    assert main(["upcycle", "--from", str(run / "checkpoints"), "--recipe", recipe, "--out", str(out), *sets]) == 0
    printed = capsys.readouterr().out
    router = "virtual_groups" if order == "topk_then_softmax" else "zero"
    assert f"G=4 shards per copy, E=16 experts = 4 copies, k=4 per token; router {router}" in printed
    assert [p.name for p in list_complete(out)] == ["step_00000000"]
    report = json.loads((out / "upcycle.json").read_text())
    assert report["exact"] and report["source"].endswith("step_00000020")

    steps = 12
    moe_job = load_job_config(
        recipe, [*COMMON, f"trainer.run_dir={tmp_path / 'moe'}", f"trainer.steps={steps}", "trainer.eval_interval=6"]
    )
    moe = Trainer(moe_job, resume=str(out)).run()
    # Before its first step the MoE computes what the dense model computed after its last.
    assert abs(moe.eval_losses[0] - dense.eval_losses[20]) <= 1e-4, (moe.eval_losses[0], dense.eval_losses[20])
    # No spike: a fresh optimizer warms up again, so no step's loss rises far above where the
    # dense run ended (its last steps' losses, which vary by batch by a few percent).
    dense_end = max(dense.losses[s] for s in range(16, 21))
    assert all(math.isfinite(v) for v in moe.losses.values())
    assert max(moe.losses.values()) <= 1.05 * dense_end, (moe.losses, dense_end)
    # (The data restarts from its first batch, which the dense model saw 20 steps ago.)
    assert moe.eval_losses[6] <= moe.eval_losses[0] + 0.02, moe.eval_losses
    assert moe.eval_losses[steps] <= moe.eval_losses[0] + 0.02, moe.eval_losses


def test_refusals_name_the_setting_and_write_nothing(tmp_path, dense_run, capsys):
    run, _ = dense_run
    source = str(run / "checkpoints")
    out = tmp_path / "out"
    # k = 1 expert per token is not a multiple of G = 4.
    recipe = moe_recipe(tmp_path, top_k=1, granularity=1, num_experts=8, expert_hidden=48)
    assert main(["upcycle", "--from", source, "--recipe", recipe, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "moe.top_k: top_k x granularity = 1 experts per token is not a multiple of G = 4" in err
    assert "--allow-inexact" in err and not out.exists()

    assert main(["upcycle", "--from", source, "--recipe", recipe, "--out", str(out), "--allow-inexact"]) == 0
    captured = capsys.readouterr()
    assert "warning: upcycling is not function-preserving: moe.top_k" in captured.err
    assert "INEXACT: moe.top_k" in captured.out
    assert not json.loads((out / "upcycle.json").read_text())["exact"]

    # Never into a non-empty folder.
    assert main(["upcycle", "--from", source, "--recipe", moe_recipe(tmp_path), "--out", str(out)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err

    # Shapes that differ from the dense model's are named.
    fresh = tmp_path / "fresh"
    args = ["upcycle", "--from", source, "--recipe", moe_recipe(tmp_path), "--out", str(fresh)]
    assert main([*args, "--set", "model.dim=128"]) == 2
    assert "model.dim: dense model 64, MoE recipe 128" in capsys.readouterr().err
    # A dense recipe is not an upcycling target; an MoE checkpoint is not a source.
    assert main(["upcycle", "--from", source, "--recipe", "debug-dense", "--out", str(fresh)]) == 2
    assert "is dense" in capsys.readouterr().err
    assert main(["upcycle", "--from", str(out), "--recipe", moe_recipe(tmp_path), "--out", str(fresh)]) == 2
    assert "is already an MoE" in capsys.readouterr().err
    assert main(["upcycle", "--from", str(tmp_path / "nowhere"), "--recipe", "tiny", "--out", str(fresh)]) == 2
    assert not fresh.exists()


def test_hugging_face_source_gives_the_same_checkpoint(tmp_path, dense_run):
    """A dense model exported to a Hugging Face (Llama) folder upcycles to the same MoE as its checkpoint."""
    run, _ = dense_run
    dense, _ = load_dense(run / "checkpoints")
    hf = save_hf(tmp_path / "hf", dense.model_cfg, dense.attn_cfg, MoEConfig(), dense.state_dict())
    recipe = moe_recipe(tmp_path)
    from_hf = upcycle_checkpoint(hf, recipe, tmp_path / "from_hf", COMMON)
    from_ckpt = upcycle_checkpoint(run / "checkpoints", recipe, tmp_path / "from_ckpt", COMMON)
    assert not from_hf.plan.inexact and "Hugging Face llama" in (tmp_path / "from_hf" / "upcycle.json").read_text()
    job = load_job_config(recipe, COMMON)
    job.model.vocab_size = dense.model_cfg.vocab_size
    states = []
    for written in (from_hf.checkpoint, from_ckpt.checkpoint):
        with torch.device("meta"):
            model = Transformer(job.model, job.attention, job.moe)
        model.to_empty(device="cpu")
        model.init_weights()
        CheckpointManager(written.parent).load(written, model)
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
