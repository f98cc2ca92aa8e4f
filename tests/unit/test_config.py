"""Job config: recipes, overrides, typed errors that name the key, documentation."""

import dataclasses
import re
import typing

import pytest
import yaml

from sparsetron.model.config import ConfigError
from sparsetron.train.config import JobConfig
from sparsetron.train.config_io import (
    describe,
    dump_yaml,
    field_docs,
    from_dict,
    load_job_config,
    recipe_names,
)


def all_section_classes():
    hints = typing.get_type_hints(JobConfig)
    return [JobConfig] + [hints[f.name] for f in dataclasses.fields(JobConfig)]


@pytest.mark.parametrize("name", recipe_names())
def test_every_shipped_recipe_loads_and_round_trips(name):
    job = load_job_config(name)
    again = from_dict(JobConfig, yaml.safe_load(dump_yaml(job)), "")
    assert again == job


def test_recipes_include_tiny_and_a_flavor_per_family():
    names = recipe_names()
    assert "tiny" in names
    families = {(j.moe.enabled, j.moe.score_func) for j in map(load_job_config, names)}
    assert {(False, "softmax"), (True, "softmax"), (True, "sigmoid")} <= families


@pytest.mark.parametrize("cls", all_section_classes(), ids=lambda c: c.__name__)
def test_every_field_is_documented(cls):
    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name, "").strip()]
    assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_describe_lists_every_leaf_key():
    keys = {key for key, _, _ in describe()}
    assert "moe.capacity_factor" in keys and "trainer.steps" in keys
    assert all(doc for _, _, doc in describe())


def test_overrides_are_typed_and_applied():
    job = load_job_config("tiny", ["moe.top_k=2", "optimizer.lr=1e-3", "optimizer.betas=[0.8, 0.9]"])
    assert job.moe.top_k == 2
    assert job.optimizer.lr == pytest.approx(1e-3) and isinstance(job.optimizer.lr, float)
    assert job.optimizer.betas == [0.8, 0.9]


def test_integer_accepted_for_float_but_not_the_reverse():
    assert load_job_config(None, ["optimizer.lr=1"]).optimizer.lr == 1.0
    assert load_job_config(None, ["optimizer.lr=2e-4"]).optimizer.lr == 2e-4  # YAML 1.1 reads this as a string
    with pytest.raises(ConfigError, match=r"optimizer\.lr: expected a number, got 'fast'"):
        load_job_config(None, ["optimizer.lr=fast"])
    with pytest.raises(ConfigError, match=r"model\.dim: expected an integer, got 1\.5"):
        load_job_config(None, ["model.dim=1.5"])


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("moe.num_expert=3", r"unknown key moe\.num_expert; allowed in moe: num_experts"),
        ("modle.dim=3", r"unknown key modle"),
        ("moe.score_func=relu", r"moe\.score_func: 'relu' is not one of softmax, sigmoid"),
        ("parallel.compile=yes please", r"parallel\.compile: expected true or false"),
        ("trainer.steps=ten", r"trainer\.steps: expected an integer, got 'ten'"),
        ("data.paths=a.txt", r"data\.paths: expected a list"),
        ("model.dim", r"must look like section\.key=value"),
        ("moe=3", r"must look like section\.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_job_config("tiny", [override])


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["attention.n_heads=3"], r"attention\.n_heads: 3 must divide model\.dim=128"),
        (["attention.n_kv_heads=3"], r"attention\.n_kv_heads: 3 must divide n_heads=4"),
        (["moe.top_k=5"], r"moe\.top_k: top_k x granularity = 20 exceeds num_experts x granularity = 16"),
        (["moe.score_func=sigmoid"], r"moe\.norm_topk_prob: must be true when score_func is sigmoid"),
        (["moe.n_groups=3"], r"moe\.n_groups: 3 must be >= 1 and divide the 16 routed experts"),
        (["moe.n_groups=4", "moe.topk_groups=5"], r"moe\.topk_groups: must be in \[1, n_groups=4\]"),
        (["moe.n_groups=8", "moe.topk_groups=1"], r"best 1 groups hold 2 experts, fewer than top_k x granularity = 4"),
        (["moe.first_k_dense=9"], r"moe\.first_k_dense: must be in \[0, model\.n_layers=4\]"),
        (["data.seq_len=9000"], r"data\.seq_len: 9000 exceeds model\.max_seq_len=4096"),
        (["data.source=jsonl"], r"data\.paths: source 'jsonl' needs at least one path"),
        (["schedule.warmup_steps=1000"], r"schedule\.warmup_steps: must be in \[0, trainer\.steps=300\]"),
        (["trainer.stop_at=301"], r"trainer\.stop_at: must be <= trainer\.steps=300"),
        (["data.val_fraction=0"], r"data\.val_fraction: must be strictly between 0 and 1"),
    ],
)
def test_inconsistent_values_name_the_key(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_job_config("tiny", overrides)


def test_validation_runs_after_all_overrides():
    # Each override alone is inconsistent with tiny; together they are fine.
    job = load_job_config("tiny", ["moe.n_groups=4", "moe.topk_groups=2"])
    assert job.moe.n_groups == 4


def test_recipe_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="neither a config file nor a shipped recipe; recipes: .*tiny"):
        load_job_config("no-such-recipe")
    with pytest.raises(ConfigError, match=r"missing\.yaml does not exist"):
        load_job_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_job_config(str(bad))
    flat = tmp_path / "flat.yaml"
    flat.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_job_config(str(flat))
    section = tmp_path / "section.yaml"
    section.write_text("model: 7\n")
    with pytest.raises(ConfigError, match="model: expected a mapping"):
        load_job_config(str(section))


def test_recipe_file_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model: {dim: 96}\nattention: {n_heads: 3}\n")
    job = load_job_config(str(path), ["trainer.steps=7", "schedule.warmup_steps=1"])
    assert (job.model.dim, job.attention.n_heads, job.trainer.steps) == (96, 3, 7)


def test_odd_yaml_shapes_get_clear_errors_or_work(tmp_path):
    numeric = tmp_path / "numeric.yaml"
    numeric.write_text("model: {1: 2, dimm: 3}\n")
    with pytest.raises(ConfigError, match=r"unknown key model\.1, model\.dimm"):
        load_job_config(str(numeric))
    empty_section = tmp_path / "empty.yaml"
    empty_section.write_text("model:\n")
    assert load_job_config(str(empty_section), ["model.dim=64"]).model.dim == 64


@pytest.mark.parametrize(
    "setting, message",
    [
        ("parallel.step_timeout_s=0", "parallel.step_timeout_s: must be a positive number of seconds, got 0"),
        ("parallel.init_timeout_s=-1", "parallel.init_timeout_s: must be a positive number of seconds, got -1"),
        ("trainer.max_hours=-0.5", "trainer.max_hours: must be >= 0, got -0.5"),
    ],
)
def test_timeouts_and_the_time_limit_are_refused_by_name(setting, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_job_config("debug-dense", [setting])
