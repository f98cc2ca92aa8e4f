"""`sparsetron upcycle`: a dense checkpoint becomes the step-0 checkpoint of an MoE recipe.

    sparsetron upcycle --from runs/dense/checkpoints --recipe tiny --out runs/tiny-up/init
    sparsetron train tiny --resume runs/tiny-up/init        # a fresh optimizer, data from the start

DENSE is a sparsetron checkpoint (a complete step folder, or a folder of them: the newest) or a
local Hugging Face Llama / Qwen2-style folder (config.json + safetensors, read by model/hf/).
The recipe (with its --set overrides) gives the MoE job; its model and attention sections must
match the dense model's (model/upcycle.py names every difference). The output is an ordinary
checkpoint folder `<out>/step_00000000` written by CheckpointManager: the MoE weights, a
never-stepped optimizer, a step-0 train state and the resolved job config, so `sparsetron
train RECIPE --resume OUT` (same overrides) continues from it, evaluating it before its first
step. `<out>/upcycle.json` records the source and the plan. Nothing is overwritten: `out` must
not exist or be empty.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsetron.model.config import AttentionConfig, ConfigError, ModelConfig
from sparsetron.model.hf import CONFIG_FILE, config_from_hf, load_hf, read_hf_config, require_empty_folder
from sparsetron.model.transformer import Transformer, materialised_transformer
from sparsetron.model.upcycle import UpcycleError, UpcyclePlan, UpcycleWarning, plan_upcycle, upcycle
from sparsetron.train.checkpoint import CheckpointError, CheckpointManager
from sparsetron.train.config import JobConfig
from sparsetron.train.config_io import from_dict, load_job_config
from sparsetron.train.data import build_tokenizer
from sparsetron.train.step0 import save_step0
from sparsetron.train.trainer import resolve_vocab

__all__ = ["UpcycleResult", "load_dense", "upcycle_checkpoint"]

REPORT_FILE = "upcycle.json"


@dataclass
class UpcycleResult:
    checkpoint: Path
    """The step folder written."""
    plan: UpcyclePlan
    warnings: list[str]
    """The inexact settings accepted (empty when the MoE computes what the dense model did)."""


@dataclass
class DenseSource:
    """A dense model on disk, opened by its config files alone; `load()` reads the weights."""

    model: ModelConfig
    attention: AttentionConfig
    origin: str
    """Where it came from, for upcycle.json and messages."""
    load: Callable[[], Transformer]


def open_dense(source: str | Path) -> DenseSource:
    """The dense model at `source` (a sparsetron checkpoint or a Hugging Face folder), checked to
    be dense without reading any tensor."""
    source = Path(source).expanduser()
    if not source.is_dir():
        raise ConfigError(f"upcycle: --from {source} is not a folder")
    if (source / CONFIG_FILE).is_file():
        family, model_cfg, attn_cfg, moe_cfg = config_from_hf(read_hf_config(source))
        if moe_cfg.enabled:
            raise UpcycleError(f"upcycle: {source} is a Hugging Face MoE ({family}), not a dense model")
        return DenseSource(model_cfg, attn_cfg, f"Hugging Face {family} {source}", lambda: load_hf(source).build())
    manager = CheckpointManager(source)
    try:
        path = manager.resolve(str(source))
    except CheckpointError as err:
        raise ConfigError(
            f"upcycle: --from {source} is neither a sparsetron checkpoint nor a Hugging Face folder "
            f"({CONFIG_FILE} + safetensors): {err}"
        ) from err
    try:
        job = from_dict(JobConfig, manager.read_config(path), "")
    except ConfigError as err:
        raise ConfigError(f"checkpoint {path}: its config.yaml does not load: {err}") from err
    if job.moe.enabled:
        raise UpcycleError(
            f"upcycle: checkpoint {path} is already an MoE (moe.num_experts={job.moe.num_experts}); "
            "upcycling starts from a dense model"
        )

    def load() -> Transformer:
        model = materialised_transformer(job.model, job.attention, None)
        manager.load(path, model)
        return model

    return DenseSource(job.model, job.attention, f"sparsetron checkpoint {path}", load)


def load_dense(source: str | Path) -> tuple[Transformer, str]:
    """The dense model held by `source` (sparsetron or Hugging Face), and a description of where it came from."""
    dense = open_dense(source)
    return dense.load(), dense.origin


def upcycle_checkpoint(
    source: str | Path,
    recipe: str,
    out: str | Path,
    overrides: list[str] | None = None,
    *,
    allow_inexact: bool = False,
    router: str = "auto",
    shared_fraction: float = 0.5,
) -> UpcycleResult:
    """Upcycle the dense model at `source` into `recipe`'s MoE and write it as `out`/step_00000000."""
    out = Path(out).expanduser()
    require_empty_folder(out, "upcycle: --out")
    job = load_job_config(recipe, overrides)
    if not job.moe.enabled:
        raise UpcycleError(f"upcycle: recipe {recipe} is dense (moe.num_experts 0); give an MoE recipe")
    # As the trainer does, so that config.yaml is what `sparsetron train RECIPE` resolves to.
    resolve_vocab(job, build_tokenizer(job.data.tokenizer).vocab_size)
    manager = CheckpointManager(out)
    dense_source = open_dense(source)
    # Every refusal the configs decide comes before any weight is read or built.
    plan_upcycle(
        dense_source.model,
        dense_source.attention,
        job.model,
        job.attention,
        job.moe,
        router=router,
        shared_fraction=shared_fraction,
        allow_inexact=allow_inexact,
    )
    dense, origin = dense_source.load(), dense_source.origin

    # The trainer's seed and order, so the router rows are those a fresh run of the recipe starts from.
    torch.manual_seed(job.trainer.seed)
    moe = materialised_transformer(job.model, job.attention, job.moe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UpcycleWarning)
        plan = upcycle(dense, moe, router=router, shared_fraction=shared_fraction, allow_inexact=allow_inexact)
    accepted = [str(w.message) for w in caught if issubclass(w.category, UpcycleWarning)]
    for message in accepted:
        warnings.warn(message, UpcycleWarning, stacklevel=2)
    del dense

    report = {
        "source": origin,
        "recipe": recipe,
        "overrides": list(overrides or []),
        **dataclasses.asdict(plan),
        "copies": plan.copies,
        "exact": not plan.inexact,
    }
    written = save_step0(
        manager, moe, job, after_save=lambda: (out / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    )
    return UpcycleResult(checkpoint=written, plan=plan, warnings=accepted)
