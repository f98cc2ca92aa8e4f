"""What every shipped recipe's comment states holds: its parameter counts, built on the meta
device (no allocation), and for a recipe meant for GPUs its per-rank memory plan on the layout
it names, planned as `sparsetron plan NAME --nproc N --set trainer.device=cuda` plans it (train/plan.py), within
the device memory it names. An edit to a recipe that changes either without its comment fails
here. Also which recipes export to a Hugging Face family (the README lists them).

"total" counts every parameter, "active" what one token's forward multiplies with without the
input embedding (model/params.py: the N of 6N FLOPs per token)."""

import re

import pytest
import torch

from sparsetron.launch.cli import main
from sparsetron.model.config import ConfigError
from sparsetron.model.hf import export_family
from sparsetron.model.params import active_params, num_params
from sparsetron.model.transformer import Transformer
from sparsetron.parallel.memory import GIB
from sparsetron.parallel.precision import Precision
from sparsetron.train.config_io import load_job_config, recipe_names, resolve_recipe
from sparsetron.train.data import build_tokenizer
from sparsetron.train.layout import resolve_layout
from sparsetron.train.plan import stage_memory_plans
from sparsetron.train.trainer import resolve_vocab

PARAMETERS = re.compile(r"Parameters: ([\d.]+)([MB]) total, ([\d.]+)([MB]) active per token")
MEMORY = re.compile(
    r"Memory per rank on (\d+) GPUs? \((\d+) GB(?: each)?\): total ~([\d.]+) GiB = parameters ([\d.]+) "
    r"\+ gradients ([\d.]+) \+ AdamW states ([\d.]+) \+ activations ~([\d.]+) \(estimate\)"
)
UNITS = {"M": 1e6, "B": 1e9}
# The recipes `sparsetron convert --format hf` exports, and the family each becomes; the others
# have a setting no supported family represents (model/hf/config.py's export_family names it).
EXPORTED = {
    "bench-1b-dense": "llama",
    "debug-dense": "llama",
    "debug-qwen-moe": "qwen2_moe",
    "dense-1b": "llama",
    "moe-4b-a1b": "qwen3_moe",
}


def comment(name: str) -> str:
    """The recipe's comment lines joined into one text (a statement may wrap over lines)."""
    lines = resolve_recipe(name).read_text().splitlines()
    return " ".join(line.lstrip("#").strip() for line in lines if line.startswith("#"))


def resolved(name: str):
    job = load_job_config(name)
    resolve_vocab(job, build_tokenizer(job.data.tokenizer).vocab_size)
    return job


def meant_for_gpus(job) -> bool:
    p = job.parallel
    degrees = (p.data_parallel_replicate, p.data_parallel_shard, p.context, p.tensor, p.pipeline, p.expert)
    return job.trainer.precision == "bf16" or any(d != 1 for d in degrees)


def rounded_like(value: str, unit: str, actual: int) -> float:
    """`actual` in the statement's unit, rounded to as many decimals as the statement has."""
    return round(actual / UNITS[unit], len(value.partition(".")[2]))


@pytest.mark.parametrize("name", recipe_names())
def test_recipe_states_its_parameter_counts(name):
    match = PARAMETERS.search(comment(name))
    assert match, f"configs/{name}.yaml states no 'Parameters: XB total, YB active per token'"
    job = resolved(name)
    with torch.device("meta"):
        model = Transformer(job.model, job.attention, job.moe)
    total, total_unit, active, active_unit = match.groups()
    assert rounded_like(total, total_unit, num_params(model)) == float(total)
    assert rounded_like(active, active_unit, active_params(job.model, job.attention, job.moe)) == float(active)


@pytest.mark.parametrize("name", recipe_names())
def test_gpu_recipe_states_its_memory_plan_and_fits(name):
    job = resolved(name)
    text = comment(name)
    match = MEMORY.search(text)
    if not meant_for_gpus(job):
        assert match is None, f"configs/{name}.yaml is a CPU recipe but states a GPU memory plan"
        return
    assert match, f"configs/{name}.yaml is meant for GPUs but states no 'Memory per rank on N GPUs (G GB): ...'"
    nproc, device_gb, *figures = match.groups()
    assert f"sparsetron plan {name} --nproc {nproc} --set trainer.device=cuda" in text
    cuda = torch.device("cuda")
    dims = resolve_layout(job, int(nproc))
    plan = stage_memory_plans(job, dims, Precision.from_config(job.trainer.precision, cuda), cuda)[0]
    parts = (plan.total_bytes, plan.parameter_bytes, plan.gradient_bytes, plan.optimizer_bytes, plan.activation_bytes)
    assert [float(f) for f in figures] == [round(b / GIB, 2) for b in parts]
    assert plan.total_bytes <= int(device_gb) * 1e9


@pytest.mark.parametrize("name", recipe_names())
def test_recipe_exports_to_the_family_the_readme_names(name):
    job = load_job_config(name)
    if name in EXPORTED:
        assert export_family(job.model, job.attention, job.moe) == EXPORTED[name]
    else:
        with pytest.raises(ConfigError, match="no Hugging Face family represents it"):
            export_family(job.model, job.attention, job.moe)


def test_realistic_recipes_are_listed(capsys):
    assert main(["recipes"]) == 0
    assert {"dense-1b", "moe-4b-a1b", "moe-16b"} <= set(capsys.readouterr().out.split())
