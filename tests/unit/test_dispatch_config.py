"""moe.dispatcher: which dispatcher runs at which parallel.expert, the refusals (naming both keys),
and that the dispatcher is a layout choice: a checkpoint resumes under another one, listed as a change."""

import pytest
import torch

from sparsetron.model.config import ConfigError, ModelConfig, MoEConfig
from sparsetron.model.moe import MoE
from sparsetron.train.config_io import load_job_config, to_dict
from sparsetron.train.resume import compare_with_checkpoint

EP2 = ["parallel.data_parallel_shard=2", "parallel.expert=2"]


@pytest.mark.parametrize(
    ("setting", "expert", "runs"),
    [
        ("auto", 1, "local"),
        ("auto", 2, "all_to_all"),
        ("auto", 8, "all_to_all"),
        ("local", 1, "local"),
        ("all_to_all", 2, "all_to_all"),
        ("overlapped", 4, "overlapped"),
    ],
)
def test_dispatcher_resolves_at_the_expert_degree(setting, expert, runs):
    assert MoEConfig(num_experts=8, dispatcher=setting).dispatcher_for(expert) == runs


def test_auto_is_the_default_and_runs_at_every_expert_degree():
    assert load_job_config("debug-deepseek").moe.dispatcher == "auto"
    assert load_job_config("debug-deepseek", EP2).moe.dispatcher == "auto"


@pytest.mark.parametrize(
    ("setting", "overrides", "expert"), [("local", EP2, 2), ("all_to_all", [], 1), ("overlapped", [], 1)]
)
def test_a_dispatcher_that_cannot_run_at_the_layout_is_refused_by_name(setting, overrides, expert):
    with pytest.raises(ConfigError) as err:
        load_job_config("debug-deepseek", [f"moe.dispatcher={setting}", *overrides])
    message = str(err.value)
    assert message.startswith("moe.dispatcher:") and f"parallel.expert={expert}" in message, message


@pytest.mark.parametrize("setting", ["all_to_all", "overlapped"])
def test_a_plain_layer_set_to_exchange_refuses_to_run_instead_of_running_local(setting):
    dim = 16
    layer = MoE(dim, ModelConfig(dim=dim, ffn_hidden=32), MoEConfig(num_experts=4, top_k=2, dispatcher=setting))
    layer.init_weights(0.02, 0.02)
    with pytest.raises(ConfigError, match=rf"moe\.dispatcher={setting}.*apply_ep"):
        layer(torch.randn(2, 5, dim))


def test_overlap_chunks_below_one_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"^moe\.overlap_chunks:.*got 0"):
        load_job_config("debug-deepseek", ["moe.overlap_chunks=0", "moe.dispatcher=overlapped", *EP2])


@pytest.mark.parametrize(
    ("saved_setting", "saved_layout", "setting", "layout"),
    [
        ("all_to_all", EP2, "auto", []),  # ep2 -> one process
        ("auto", [], "all_to_all", EP2),  # one process -> ep2
        ("local", EP2, "auto", EP2),  # written before the setting was checked, when local ran at ep2 too
    ],
)
def test_a_dispatcher_change_is_listed_on_resume_not_refused(tmp_path, saved_setting, saved_layout, setting, layout):
    saved = to_dict(load_job_config("debug-deepseek", saved_layout))
    saved["moe"]["dispatcher"] = saved_setting
    job = load_job_config("debug-deepseek", [f"moe.dispatcher={setting}", *layout])
    changed = compare_with_checkpoint(job, saved, tmp_path)
    assert f"moe.dispatcher: {saved_setting!r} -> {setting!r}" in changed, changed
