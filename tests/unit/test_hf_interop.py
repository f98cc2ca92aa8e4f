"""Hugging Face interop (model/hf.py, train/hf_convert.py, `sparsetron convert`): tiny random
models of each family built with `transformers` in the test, imported, compared with
transformers' own logits in fp32; exports and re-imports exact tensor for tensor; every
option sparsetron cannot represent refused by name."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from sparsetron.launch.cli import main  # noqa: E402
from sparsetron.model.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig  # noqa: E402
from sparsetron.model.hf import HFFormatError, config_from_hf, config_to_hf, load_hf, save_hf  # noqa: E402
from sparsetron.model.params import active_params, num_params  # noqa: E402
from sparsetron.model.transformer import Transformer  # noqa: E402
from sparsetron.train.checkpoint import CheckpointManager  # noqa: E402
from sparsetron.train.config import JobConfig  # noqa: E402
from sparsetron.train.config_io import from_dict  # noqa: E402

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(intermediate_size=96)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(intermediate_size=96)),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    ),
    # A dense first layer (mlp_only_layers prefix) and a shared expert of 2 x moe_intermediate_size.
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            intermediate_size=96,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_experts=4,
            num_experts_per_tok=2,
            mlp_only_layers=[0],
        ),
    ),
    # head_dim 24 differs from hidden / heads = 16, as in the real Qwen3-MoE models; renormalised
    # top-k weights (qwen2_moe above keeps transformers' default of none).
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            intermediate_size=96,
            moe_intermediate_size=32,
            num_experts=4,
            num_experts_per_tok=2,
            head_dim=24,
            norm_topk_prob=True,
        ),
    ),
}


def hf_model(family: str, seed: int = 0, **overrides):
    config_cls, model_cls, extra = FAMILIES[family]
    cfg = getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides}, attn_implementation="eager")
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():
        # transformers initialises biases to 0 and norms to 1; random values make the test see them.
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def logits_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (transformers model, its save_pretrained folder)."""
    out = {}
    for family in FAMILIES:
        model = hf_model(family)
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        out[family] = (model, folder)
    return out


TOKENS = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(saved, family):
    hf, folder = saved[family]
    ckpt = load_hf(folder)
    assert ckpt.family == family
    model = ckpt.build().eval()
    with torch.no_grad():
        err = logits_error(model(TOKENS), hf(TOKENS).logits)
    assert err <= 1e-5, f"{family}: relative error {err:.2e}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_and_reimport_are_exact(saved, family, tmp_path):
    _, folder = saved[family]
    ckpt = load_hf(folder)
    model = ckpt.build()
    save_hf(tmp_path / "out", ckpt.model, ckpt.attention, ckpt.moe, model.state_dict())
    original, exported = load_file(folder / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert original.keys() == exported.keys()
    for name in original:
        assert original[name].dtype == exported[name].dtype and torch.equal(original[name], exported[name]), name
    again = load_hf(tmp_path / "out")
    assert (again.model, again.attention, again.moe) == (ckpt.model, ckpt.attention, ckpt.moe)
    assert again.state_dict.keys() == ckpt.state_dict.keys()
    for name in ckpt.state_dict:
        assert torch.equal(again.state_dict[name], ckpt.state_dict[name]), name
    # The exported config describes the same model to transformers.
    hf_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config_from_hf(hf_cfg)[1:] == (ckpt.model, ckpt.attention, ckpt.moe)


def test_a_shared_expert_of_any_width_imports_and_exports_exactly(tmp_path):
    # 48 shared units against experts of 32: no whole number of routed experts' widths.
    hf = hf_model("qwen2_moe", seed=3, shared_expert_intermediate_size=48)
    hf.save_pretrained(tmp_path / "hf")
    ckpt = load_hf(tmp_path / "hf")
    assert (ckpt.moe.n_shared_experts, ckpt.moe.shared_expert_hidden) == (1, 48)
    model = ckpt.build().eval()
    assert model.layers["1"].feed_forward.shared_experts.w1.weight.shape == (48, 64)
    with torch.no_grad():
        err = logits_error(model(TOKENS), hf(TOKENS).logits)
    assert err <= 1e-5, f"relative error {err:.2e}"
    assert num_params(model, exclude_embeddings=True) == sum(p.numel() for p in hf.model.layers.parameters()) + (
        sum(p.numel() for p in hf.model.norm.parameters()) + hf.lm_head.weight.numel()
    )
    # One MoE layer (layer 0 is dense): 2 of its 4 experts, 3 x 64 x 32 each, are not active.
    assert active_params(ckpt.model, ckpt.attention, ckpt.moe) == num_params(model, exclude_embeddings=True) - (
        2 * 3 * 64 * 32
    )
    save_hf(tmp_path / "out", ckpt.model, ckpt.attention, ckpt.moe, model.state_dict())
    original, exported = (
        load_file(tmp_path / "hf" / "model.safetensors"),
        load_file(tmp_path / "out" / "model.safetensors"),
    )
    assert original.keys() == exported.keys()
    for name in original:
        assert original[name].dtype == exported[name].dtype and torch.equal(original[name], exported[name]), name
    hf_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf_cfg["shared_expert_intermediate_size"] == 48
    assert config_from_hf(hf_cfg)[1:] == (ckpt.model, ckpt.attention, ckpt.moe)


def test_sharded_checkpoints_import_and_export(saved, tmp_path):
    hf, folder = saved["qwen2_moe"]
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    whole, sharded = load_hf(folder), load_hf(tmp_path / "sharded")
    for name in whole.state_dict:
        assert torch.equal(whole.state_dict[name], sharded.state_dict[name]), name
    save_hf(tmp_path / "out", whole.model, whole.attention, whole.moe, whole.state_dict, max_shard_bytes=30_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    for name, tensor in hf.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_bf16_checkpoint_round_trips_exactly(tmp_path):
    hf = hf_model("llama").to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf")
    ckpt = load_hf(tmp_path / "hf")
    assert all(t.dtype == torch.bfloat16 for t in ckpt.state_dict.values())
    model = ckpt.build()  # fp32 parameters: the widening is exact
    save_hf(tmp_path / "out", ckpt.model, ckpt.attention, ckpt.moe, model.state_dict(), dtype="bfloat16")
    original, exported = (
        load_file(tmp_path / "hf" / "model.safetensors"),
        load_file(tmp_path / "out" / "model.safetensors"),
    )
    assert original.keys() == exported.keys()
    assert all(exported[k].dtype == torch.bfloat16 and torch.equal(original[k], exported[k]) for k in original)


def test_tied_embeddings(tmp_path):
    hf = hf_model("qwen2", tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "hf")
    ckpt = load_hf(tmp_path / "hf")
    assert ckpt.model.tie_embeddings
    model = ckpt.build().eval()
    assert model.output.weight is model.tok_embeddings.weight
    with torch.no_grad():
        assert logits_error(model(TOKENS), hf(TOKENS).logits) <= 1e-5
    save_hf(tmp_path / "out", ckpt.model, ckpt.attention, ckpt.moe, model.state_dict())
    assert "lm_head.weight" not in load_file(tmp_path / "out" / "model.safetensors")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS).logits, hf(TOKENS).logits)


# ---- refusals ---------------------------------------------------------------------------


def hf_config(family: str, **changes) -> dict:
    config_cls, _, extra = FAMILIES[family]
    cfg = getattr(transformers, config_cls)(**{**COMMON, **extra}).to_dict()
    cfg.update(changes)
    return cfg


REFUSED = [
    ("llama", {"model_type": "gemma"}, "model_type='gemma'"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope_type='linear'"),
    ("llama", {"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling="),
    ("llama", {"attention_dropout": 0.1}, "attention_dropout=0.1"),
    ("llama", {"attention_bias": True}, "attention_bias=True"),
    ("llama", {"mlp_bias": True}, "mlp_bias=True"),
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window=True"),
    ("qwen2", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types[1]='sliding_attention'"),
    ("mixtral", {"sliding_window": 4096}, "sliding_window=4096"),
    ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise=0.1"),
    ("qwen3_moe", {"attention_bias": True}, "attention_bias=True"),
    ("qwen3_moe", {"mlp_only_layers": [1]}, "mlp_only_layers=[1]"),
    ("qwen3_moe", {"decoder_sparse_step": 2, "num_hidden_layers": 4}, "decoder_sparse_step=2"),
    ("qwen2_moe", {"shared_expert_intermediate_size": 0}, "shared_expert_intermediate_size=0"),
]


@pytest.mark.parametrize(("family", "changes", "named"), REFUSED, ids=[r[2].split("=")[0] for r in REFUSED])
def test_unrepresentable_options_are_refused_by_name(family, changes, named):
    with pytest.raises(ConfigError, match="config.json") as info:
        config_from_hf(hf_config(family, **changes))
    assert named in str(info.value)


def test_dense_prefix_maps_to_first_k_dense():
    _, _, _, moe = config_from_hf(hf_config("qwen3_moe", mlp_only_layers=[0]))
    assert moe.first_k_dense == 1
    # Every second layer sparse, of two: layer 0 dense, a prefix.
    assert config_from_hf(hf_config("qwen3_moe", decoder_sparse_step=2))[3].first_k_dense == 1
    assert config_to_hf(*config_from_hf(hf_config("qwen3_moe", mlp_only_layers=[0]))[1:])["mlp_only_layers"] == [0]


def test_bad_files_are_refused(saved, tmp_path):
    _, folder = saved["llama"]
    with pytest.raises(HFFormatError, match="no config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(HFFormatError, match="only safetensors"):
        load_hf(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    save_file({**tensors, "model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}, tmp_path / "model.safetensors")
    with pytest.raises(HFFormatError, match="o_proj.bias"):
        load_hf(tmp_path)
    del tensors["model.norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(HFFormatError, match="model.norm.weight is missing"):
        load_hf(tmp_path)


def _sparsetron(moe: MoEConfig | None = None, **attention) -> tuple:
    model = ModelConfig(vocab_size=VOCAB, dim=64, n_layers=2, ffn_hidden=96, max_seq_len=128)
    return model, AttentionConfig(n_heads=4, **attention), moe or MoEConfig()


EXPORT_REFUSED = [
    (_sparsetron(qk_norm=True), "attention.qk_norm=True"),
    (_sparsetron(backend="moba"), "attention.backend='moba'"),
    (_sparsetron(MoEConfig(num_experts=4, capacity_factor=1.0)), "moe.capacity_factor=1.0"),
    (_sparsetron(MoEConfig(num_experts=4, score_func="sigmoid", norm_topk_prob=True)), "moe.score_func='sigmoid'"),
    (_sparsetron(MoEConfig(num_experts=4, n_shared_experts=1)), "moe.shared_expert_gate=False"),
    (_sparsetron(MoEConfig(num_experts=4, first_k_dense=1, norm_topk_prob=True)), "moe.first_k_dense=1"),
    (_sparsetron(MoEConfig(num_experts=4)), "moe.norm_topk_prob=False"),
    (_sparsetron(MoEConfig(num_experts=4, norm_topk_prob=True, router_input="pre_attention")), "moe.router_input"),
]


@pytest.mark.parametrize(("configs", "named"), EXPORT_REFUSED, ids=[r[1].split("=")[0] for r in EXPORT_REFUSED])
def test_unexportable_models_are_refused_by_name(configs, named, tmp_path):
    with torch.device("meta"):
        sd = Transformer(*configs).state_dict()
    with pytest.raises(ConfigError, match="no Hugging Face family") as info:
        save_hf(tmp_path / "out", *configs, sd)
    assert named in str(info.value)
    assert not (tmp_path / "out").exists()


def test_selection_bias_is_refused_on_export(saved, tmp_path):
    ckpt = load_hf(saved["mixtral"][1])
    ckpt.state_dict["layers.1.feed_forward.router.expert_bias"] = torch.tensor([0.0, 0.1, 0.0, 0.0])
    with pytest.raises(ConfigError, match="expert_bias"):
        save_hf(tmp_path / "out", ckpt.model, ckpt.attention, ckpt.moe, ckpt.state_dict)
    assert not (tmp_path / "out").exists()


def test_export_never_overwrites(saved, tmp_path):
    ckpt = load_hf(saved["llama"][1])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        save_hf(tmp_path / "out", ckpt.model, ckpt.attention, ckpt.moe, ckpt.state_dict)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


# ---- the qkv_bias option ----------------------------------------------------------------


def test_qkv_bias_off_by_default_and_counted():
    model, attention, _ = _sparsetron()
    assert Transformer(model, attention).layers["0"].attention.wq.bias is None
    for qkv_bias in (False, True):
        attention = AttentionConfig(n_heads=4, n_kv_heads=2, qkv_bias=qkv_bias)
        built = Transformer(model, attention)
        assert num_params(built, exclude_embeddings=True) == active_params(model, attention)


# ---- the command line -------------------------------------------------------------------


def test_cli_round_trip(saved, tmp_path, capsys):
    hf, folder = saved["qwen2_moe"]
    ck, out = tmp_path / "ck", tmp_path / "out"
    assert main(["convert", "--from", str(folder), "--to", str(ck), "--format", "sparsetron"]) == 0
    step = ck / "step_00000000"
    config = CheckpointManager(ck).read_config(step)
    assert config["checkpoint"]["folder"] == str(ck.resolve())
    assert config["attention"]["qkv_bias"] and config["moe"]["shared_expert_gate"]

    # Readable as any sparsetron checkpoint: the weights are the imported ones.
    imported = load_hf(folder)
    with torch.device("meta"):
        model = Transformer(imported.model, imported.attention, imported.moe)
    model.to_empty(device="cpu")
    model.init_weights()
    CheckpointManager(ck).load(step, model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, imported.state_dict[name].float()), name

    assert main(["convert", "--from", str(ck), "--to", str(out), "--format", "hf"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(reloaded) is type(hf)
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS).logits, hf(TOKENS).logits)
    original, exported = load_file(folder / "model.safetensors"), load_file(out / "model.safetensors")
    assert original.keys() == exported.keys() and all(torch.equal(original[k], exported[k]) for k in original)


def test_cli_errors(saved, tmp_path, capsys):
    _, folder = saved["llama"]
    args = ["--format", "sparsetron"]
    assert main(["convert", "--from", str(tmp_path / "missing"), "--to", str(tmp_path / "a"), *args]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["convert", "--from", str(tmp_path), "--to", str(tmp_path / "a"), *args]) == 2
    assert "neither a Hugging Face checkpoint nor" in capsys.readouterr().err.replace(
        " (config.json + safetensors)", ""
    )
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["convert", "--from", str(folder), "--to", str(tmp_path / "full"), *args]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["convert", "--from", str(folder), "--to", str(tmp_path / "a"), "--format", "hf"]) == 2
    assert "already a hf checkpoint" in capsys.readouterr().err

    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((folder / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    assert main(["convert", "--from", str(bad), "--to", str(tmp_path / "a"), *args]) == 2
    assert "hidden_act='gelu'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_imported_checkpoint_resumes_training(tmp_path, capsys):
    # A vocabulary that holds the byte tokenizer's 257 tokens; the data settings are fixed at import.
    hf = hf_model("llama", vocab_size=320)
    hf.save_pretrained(tmp_path / "hf")
    data = ["--set", "data.max_documents=40", "--set", "data.seq_len=32"]
    ck = tmp_path / "ck"
    assert main(["convert", "--from", str(tmp_path / "hf"), "--to", str(ck), "--format", "sparsetron", *data]) == 0
    config = str(ck / "step_00000000" / "config.yaml")
    run = [
        *("--set", "trainer.steps=1", "--set", "schedule.warmup_steps=0", "--set", "trainer.micro_batch_size=2"),
        *("--set", "trainer.eval_batches=1", "--set", f"trainer.run_dir={tmp_path / 'run'}"),
        *("--set", "metrics.console=none", "--set", "metrics.tensorboard=false"),
    ]
    assert main(["train", config, "--resume", "auto", *run]) == 0
    assert "done: step 1" in capsys.readouterr().out
    assert (ck / "step_00000001").is_dir()


def test_a_trained_shipped_moe_recipe_exports_to_what_transformers_runs_alike(tmp_path, capsys):
    # debug-qwen-moe, shrunk in data only, trained a step: its q/k/v biases have left their
    # initial zeros, so the export carries trained values.
    run = tmp_path / "run"
    overrides = [
        *("trainer.steps=1", "schedule.warmup_steps=0", "trainer.micro_batch_size=2", "trainer.eval_interval=0"),
        *("data.max_documents=40", "data.seq_len=32", "metrics.console=none", "metrics.tensorboard=false"),
        f"trainer.run_dir={run}",
    ]
    assert main(["train", "debug-qwen-moe", *(arg for item in overrides for arg in ("--set", item))]) == 0
    out = tmp_path / "hf"
    assert main(["convert", "--from", str(run / "checkpoints"), "--to", str(out), "--format", "hf"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out

    manager = CheckpointManager(run / "checkpoints")
    step = manager.latest()
    job = from_dict(JobConfig, manager.read_config(step), "")
    ours = Transformer(job.model, job.attention, job.moe).eval()
    manager.load(step, ours)
    assert ours.layers["0"].attention.wq.bias.abs().max() > 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(theirs) is transformers.Qwen2MoeForCausalLM
    with torch.no_grad():
        err = logits_error(ours(TOKENS), theirs(TOKENS).logits)
    assert err <= 1e-5, f"relative error {err:.2e}"


def test_cli_refuses_model_overrides(saved, tmp_path, capsys):
    _, folder = saved["llama"]
    args = ["convert", "--from", str(folder), "--to", str(tmp_path / "a"), "--format", "sparsetron"]
    assert main([*args, "--set", "moe.num_experts=4"]) == 2
    assert "moe.num_experts=4: the model, attention, moe sections come from" in capsys.readouterr().err
    assert main([*args, "--set", "data.nope=1"]) == 2
    assert "unknown key data.nope" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
