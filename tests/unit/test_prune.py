"""Expert pruning (model/prune.py, `sparsetron prune`): the pruned model computes what the original
did when the pruned experts receive no token; the usage statistics against a direct count; the
plan and the merge against their definitions; the written config rebuilds the same shapes; the
command writes a checkpoint that evaluates and trains, and refuses by name what it cannot do."""

import copy
import json
import random

import pytest
import torch
import torch.nn.functional as F
import yaml
from tolerance import assert_within_dtype_error

from sparsetron.launch.cli import main
from sparsetron.model.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig
from sparsetron.model.moe.layer import MoE
from sparsetron.model.prune import (
    ExpertUsage,
    LayerUsage,
    check_prunable,
    plan_pruning,
    prune_model,
    pruned_moe_config,
)
from sparsetron.model.transformer import Transformer, materialised_transformer
from sparsetron.train.checkpoint import CheckpointManager, list_complete
from sparsetron.train.config import JobConfig
from sparsetron.train.config_io import dump_yaml, from_dict, load_job_config
from sparsetron.train.evaluate import evaluate_checkpoint
from sparsetron.train.step0 import save_step0
from sparsetron.train.trainer import Trainer, resolve_vocab

VOCAB, E = 96, 8


def build(seed: int, **moe) -> Transformer:
    """3 blocks (the first dense), 8 routed experts of hidden 32 (num_experts 4 x G 2), 2 per token, a
    shared expert; router rows of std 1 so that routing is decisive, and routed experts (with any
    dispatch projections) of std 0.3 so that which expert a token reaches shows in the logits."""
    model_cfg = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=3, ffn_hidden=64, max_seq_len=64)
    attn_cfg = AttentionConfig(n_heads=4, n_kv_heads=2)
    moe_cfg = MoEConfig(
        **{"num_experts": 4, "granularity": 2, "top_k": 1, "n_shared_experts": 1, "first_k_dense": 1, **moe}
    )
    moe_cfg.validate(model_cfg)
    torch.manual_seed(seed)
    model = materialised_transformer(model_cfg, attn_cfg, moe_cfg)
    with torch.no_grad():
        for layer in moe_layers(model).values():
            layer.router.gate.weight.normal_(std=1.0)
            for projection in (layer.dispatch_down, layer.dispatch_up):
                if projection is not None:
                    projection.weight.normal_(std=0.3)
            for weight in layer.experts.parameters():
                weight.normal_(std=0.3)
    return model


def moe_layers(model: Transformer) -> dict[int, MoE]:
    return {int(k): b.feed_forward for k, b in model.layers.items() if isinstance(b.feed_forward, MoE)}


def tokens(gen: torch.Generator, B: int, S: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, S), generator=gen)


@pytest.mark.parametrize(
    "moe, merge",
    [
        ({"route_order": "topk_then_softmax"}, False),
        ({"route_order": "topk_then_softmax"}, True),  # unused experts weigh 0 in a merge
        ({"route_order": "softmax_then_topk", "norm_topk_prob": True}, False),
        ({"route_order": "softmax_then_topk", "score_func": "sigmoid", "norm_topk_prob": True}, True),
        ({"route_order": "topk_then_softmax", "n_groups": 2, "topk_groups": 1}, False),
        ({"route_order": "topk_then_softmax", "dispatch_dim": 16}, True),  # experts of 16-dim rows
    ],
)
def test_pruning_keeps_the_function_when_pruned_experts_get_no_tokens(moe, merge):
    """Within fp32 rounding, not bitwise: the router's GEMM over 6 rows rounds differently from
    the one over 8 (measured: 7e-8 on logits of 0.1)."""
    seed = random.randrange(1 << 30)
    model = build(seed, **moe)
    gen = torch.Generator().manual_seed(seed)
    groups = moe.get("n_groups", 1)
    # Two experts per layer (one per group) never selected: the bias moves selection, not the weights.
    pruned = {}
    for layer_id, layer in moe_layers(model).items():
        size = E // groups
        ids = sorted(random.sample(range(E), 2)) if groups == 1 else [g * size + random.randrange(size) for g in (0, 1)]
        layer.router.expert_bias[ids] = -1e4
        pruned[layer_id] = ids
    with ExpertUsage(model) as usage:
        model(tokens(gen, 4, 32))
    plan = plan_pruning(usage, 6, groups, merge)
    for layer_id, ids in pruned.items():
        assert usage.layers[layer_id].tokens_E[ids].tolist() == [0, 0], seed
        assert plan.kept[layer_id] == [e for e in range(E) if e not in ids], seed
    small = prune_model(model, pruned_moe_config(model.moe_cfg, model.model_cfg, 6, None), plan)
    assert [layer.num_experts for layer in moe_layers(small).values()] == [6, 6]

    x = tokens(gen, 3, 40)
    with torch.no_grad():
        expected, got = model(x), small(x)
        exact = copy.deepcopy(model).double()(x)
        assert_within_dtype_error(f"logits (seed {seed})", got, exact, expected)
        # Not vacuous: the experts pruned here change the output when they are routed to.
        for layer_id, layer in moe_layers(model).items():
            layer.router.expert_bias[pruned[layer_id]] = 0.0
        assert (model(x) - got).abs().max() > 1e-4, seed


def test_usage_statistics_against_a_direct_count():
    seed = random.randrange(1 << 30)
    model = build(seed, route_order="softmax_then_topk")
    gen = torch.Generator().manual_seed(seed)
    inputs = {layer_id: [] for layer_id in moe_layers(model)}
    hooks = [
        layer.register_forward_pre_hook(lambda _m, args, i=layer_id: inputs[i].append(args[0].reshape(-1, 32)))
        for layer_id, layer in moe_layers(model).items()
    ]
    with torch.no_grad(), ExpertUsage(model) as usage:
        for B, S in ((2, 16), (3, 11)):  # statistics add up over forwards
            model(tokens(gen, B, S))
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        model(tokens(gen, 2, 8))  # after the block the hooks are gone: nothing more is counted
    for layer_id, layer in moe_layers(model).items():
        count, weight, logits = [0] * E, [0.0] * E, []
        for x_TD in inputs[layer_id]:
            with torch.no_grad():
                out = layer.router(x_TD)
            for t in range(x_TD.shape[0]):
                for e, w in zip(out.indices_Tk[t].tolist(), out.weights_Tk[t].tolist(), strict=True):
                    count[e] += 1
                    weight[e] += w
            logits.append(out.logits_TE.double())
        got = usage.layers[layer_id]
        assert got.tokens_E.tolist() == count and sum(count) == (2 * 16 + 3 * 11) * 2
        torch.testing.assert_close(got.weight_E, torch.tensor(weight, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        logits_TE = torch.cat(logits)
        cosine_EE = F.cosine_similarity(logits_TE[:, :, None], logits_TE[:, None, :], dim=0)
        torch.testing.assert_close(got.similarity_EE(), cosine_EE, rtol=1e-10, atol=1e-10)


def test_plan_keeps_the_most_used_and_merges_into_the_most_similar():
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    weight_E = torch.tensor([5.0, 1.0, 3.0, 3.0, 0.5, 7.0, 2.0, 3.0], dtype=torch.float64)
    # 3.0 three times: 6 tokens beat 4, then the lower id. Expert 1 is picked most often, with little weight.
    tokens_E = torch.tensor([9, 20, 4, 6, 1, 10, 3, 6])
    logits_TE = torch.randn(50, E, generator=gen, dtype=torch.float64)
    layer = LayerUsage(tokens_E, weight_E, logits_TE.T @ logits_TE)

    plan = plan_pruning({2: layer}, 4, 1, merge=True)
    assert plan.kept[2] == [0, 3, 5, 7]
    cosine_EE = F.cosine_similarity(logits_TE[:, :, None], logits_TE[:, None, :], dim=0)
    kept = torch.tensor(plan.kept[2])
    assert plan.merged_into[2] == {p: plan.kept[2][int(cosine_EE[p, kept].argmax())] for p in (1, 2, 4, 6)}
    # Groups of 4: the 2 most used of each.
    assert plan_pruning({2: layer}, 4, 2, merge=False).kept[2] == [0, 3, 5, 7]
    assert plan_pruning({2: layer}, 2, 2, merge=False).kept[2] == [0, 5]
    assert plan_pruning({2: layer}, 4, 1, merge=False).merged_into == {}


def test_merge_is_the_usage_weighted_average():
    seed = random.randrange(1 << 30)
    model = build(seed)
    gen = torch.Generator().manual_seed(seed)
    with ExpertUsage(model) as usage, torch.no_grad():
        model(tokens(gen, 4, 32))
    plan = plan_pruning(usage, 3, 1, merge=True)
    small = prune_model(model, pruned_moe_config(model.moe_cfg, model.model_cfg, 3, None), plan)
    for layer_id, layer in moe_layers(model).items():
        u_E = usage.layers[layer_id].weight_E
        for new, q in enumerate(plan.kept[layer_id]):
            members = [q, *(p for p, target in plan.merged_into[layer_id].items() if target == q)]
            for name in ("w13", "w2"):
                w_E = getattr(layer.experts, name).detach().double()
                expected = sum(u_E[m] * w_E[m] for m in members) / u_E[members].sum()
                got = getattr(moe_layers(small)[layer_id].experts, name)[new]
                torch.testing.assert_close(got, expected.float(), rtol=2e-6, atol=1e-7)
            # The router row stays the kept expert's own.
            assert torch.equal(moe_layers(small)[layer_id].router.gate.weight[new], layer.router.gate.weight[q])


@pytest.mark.parametrize("keep, top_k", [(16, None), (12, None), (7, 3), (5, 1)])
def test_written_config_rebuilds_the_pruned_shapes(keep, top_k):
    job = load_job_config("tiny")
    job.model.vocab_size = 320
    job.moe = pruned_moe_config(job.moe, job.model, keep, top_k)
    reread = from_dict(JobConfig, yaml.safe_load(dump_yaml(job)), "")
    reread.validate()
    assert (reread.moe.routed_experts, reread.moe.experts_per_token) == (keep, top_k or 4)
    original = load_job_config("tiny")
    original.model.vocab_size = 320
    with torch.device("meta"):
        before = Transformer(original.model, original.attention, original.moe).state_dict()
        after = Transformer(reread.model, reread.attention, reread.moe).state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        routed = name.endswith(("experts.w13", "experts.w2", "router.gate.weight", "router.expert_bias"))
        expected = (keep, *tensor.shape[1:]) if routed else tensor.shape
        assert after[name].shape == expected, name


@pytest.mark.parametrize(
    "moe, keep, top_k, message",
    [
        ({"num_experts": 0}, 4, None, "moe.num_experts: the checkpoint is a dense model"),
        ({"first_k_dense": 2}, 4, None, "moe.first_k_dense: all 2 layers are dense"),
        ({}, 0, None, "--keep 0: must be in [1, 16]"),
        ({}, 17, None, "--keep 17: must be in [1, 16]"),
        ({}, 8, 9, "--top-k 9 exceeds the 8 experts kept"),
        ({}, 8, 0, "--top-k 0: must be >= 1"),
        ({}, 3, None, "moe.top_k: 4 experts per token (top_k x granularity) exceeds the 3 experts kept"),
        ({"n_groups": 4, "topk_groups": 2}, 6, None, "moe.n_groups=4: --keep 6 would leave the expert groups uneven"),
        ({"n_groups": 4, "topk_groups": 2}, 4, None, "--keep 4 would leave the expert groups uneven or under 2"),
        ({"n_groups": 4, "topk_groups": 1}, 8, 3, "moe.topk_groups=1: the best 1 groups would hold 2 experts"),
    ],
)
def test_refusals_name_the_number_or_key(moe, keep, top_k, message):
    model_cfg = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, ffn_hidden=64)
    moe_cfg = MoEConfig(**{"num_experts": 4, "granularity": 4, "top_k": 1, **moe})
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        check_prunable(moe_cfg, model_cfg, keep, top_k)


COMMON = ["data.max_documents=60", "trainer.eval_batches=2", "metrics.console=none", "metrics.tensorboard=false"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """debug-qwen-moe (16 experts of 128, 4 per token, G=2, a gated shared expert) at fresh random
    weights, saved as a step-0 checkpoint."""
    folder = tmp_path_factory.mktemp("source")
    job = load_job_config("debug-qwen-moe", [*COMMON, f"trainer.run_dir={folder / 'run'}"])
    resolve_vocab(job, 257)
    torch.manual_seed(random.randrange(1 << 30))
    save_step0(CheckpointManager(folder / "ckpt"), materialised_transformer(job.model, job.attention, job.moe), job)
    return folder / "ckpt"


def test_prune_writes_a_checkpoint_that_evaluates_and_trains(checkpoint, tmp_path, capsys):
    # All 16 kept, rewritten at granularity 1: the same function, so the same loss.
    same = tmp_path / "same"
    assert main(["prune", "--from", str(checkpoint), "--keep", "16", "--out", str(same)]) == 0
    report = json.loads((same / "prune.json").read_text())
    assert evaluate_checkpoint(same).loss == pytest.approx(report["calibration"]["source_loss"], rel=1e-6)

    out = tmp_path / "pruned"
    args = ["prune", "--from", str(checkpoint), "--keep", "6", "--top-k", "3", "--merge", "--batches", "3"]
    assert main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "layer 0: kept experts [" in printed and f"wrote {out / 'step_00000000'}" in printed
    report = json.loads((out / "prune.json").read_text())
    assert report["criterion"] == "summed routing weight" and report["calibration"]["batches"] == 3
    for layer in report["layers"].values():
        assert len(layer["kept"]) == 6 and len(layer["merged_into"]) == 10
        assert sum(layer["tokens"]) == 3 * 4 * 64 * 4  # batches x rows x positions x experts per token
        assert sorted(layer["kept"]) == layer["kept"]
        weights = layer["weight"]
        assert min(weights[e] for e in layer["kept"]) >= max(w for e, w in enumerate(weights) if e not in layer["kept"])
    written = yaml.safe_load((out / "step_00000000" / "config.yaml").read_text())
    moe = written["moe"]
    assert (moe["num_experts"], moe["granularity"], moe["top_k"], moe["expert_hidden"]) == (6, 1, 3, 128)
    assert written["trainer"]["run_dir"] == str(out / "run")

    assert main(["eval", str(out)]) == 0
    assert "step_00000000 (step 0): eval loss" in capsys.readouterr().out
    config = str(out / "step_00000000" / "config.yaml")
    job = load_job_config(config, [*COMMON, "trainer.steps=2", "checkpoint.interval=2", "trainer.eval_interval=2"])
    result = Trainer(job, resume=str(out)).run()
    assert result.step == 2 and [p.name for p in list_complete(out / "run" / "checkpoints")] == ["step_00000002"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--keep", "17"], "--keep 17: must be in [1, 16]"),
        (["--keep", "6", "--top-k", "7"], "--top-k 7 exceeds the 6 experts kept"),
        (["--keep", "6", "--set", "moe.n_groups=4", "--set", "moe.topk_groups=2"], "moe.n_groups=4: --keep 6"),
        (["--keep", "0", "--data", "held_out.txt"], "trained on data.source stdlib, which reads no files"),
    ],
)
def test_prune_refuses_before_reading_weights(checkpoint, tmp_path, capsys, monkeypatch, extra, message):
    def no_weights(*_args):
        raise AssertionError("weights were read")

    monkeypatch.setattr("sparsetron.train.prune.load_model", no_weights)
    out = tmp_path / "out"
    assert main(["prune", "--from", str(checkpoint), *extra, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_prune_never_writes_into_a_folder_that_holds_something(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["prune", "--from", str(checkpoint), "--keep", "8", "--out", str(out)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_prune_calibrates_on_data_files_and_writes_the_source_data_section(checkpoint, tmp_path):
    text = tmp_path / "calibration.txt"
    text.write_text("".join(random.choice("def return self.x = 1\n") for _ in range(3000)))
    out = tmp_path / "out"
    args = ["prune", "--from", str(checkpoint), "--keep", "8", "--out", str(out), "--batches", "2"]
    args += ["--data", str(text), "--set", "data.source=text", "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(args) == 0
    report = json.loads((out / "prune.json").read_text())
    assert report["calibration"]["data"] == "data.val_paths" and report["calibration"]["batches"] == 2
    assert all(sum(layer["tokens"]) == 2 * 4 * 64 * 4 for layer in report["layers"].values())
    data = yaml.safe_load((out / "step_00000000" / "config.yaml").read_text())["data"]
    assert data["source"] == "stdlib" and data["val_paths"] == [] and data["cache_dir"] != str(tmp_path / "cache")
