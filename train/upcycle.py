"""`sparsetron upcycle`: a dense checkpoint becomes the step-0 checkpoint of an MoE recipe.

    sparsetron upcycle --from runs/dense/checkpoints --recipe tiny --out runs/tiny-up/init
    sparsetron train tiny --resume runs/tiny-up/init        # a fresh optimizer, data from the start

    sparsetron upcycle --from runs/dense/checkpoints --recipe tiny --out runs/tiny-up/init --continue
    sparsetron train tiny --resume runs/tiny-up/init        # the dense run's schedule and data, continued

DENSE is a sparsetron checkpoint (a complete step folder, or a folder of them: the newest) or a
local Hugging Face Llama / Qwen2-style folder (config.json + safetensors, read by model/hf/).
The recipe (with its --set overrides) gives the MoE job; its model and attention sections must
match the dense model's (model/upcycle.py names every difference). The output is an ordinary
checkpoint folder `<out>/step_00000000` written by CheckpointManager: the MoE weights, a
never-stepped optimizer, a step-0 train state and the resolved job config, so `sparsetron
train RECIPE --resume OUT` (same overrides) continues from it, evaluating it before its first
step. `<out>/upcycle.json` records the source and the plan. Nothing is overwritten: `out` must
not exist or be empty.

With `--continue` (`continue_run=True`) the MoE continues the dense run instead of starting one:
the checkpoint is written at the dense checkpoint's step with its train state (step, tokens seen,
data read position, random states), so `train --resume` takes the learning rate of that step of
the MoE job's schedule (the same one when trainer.steps and the schedule are the dense run's) and
reads the batches the dense run would have read next. The optimizer is still fresh: AdamW's
moments belong to the dense parameters, and most MoE parameters are new. Refused by name: a Hugging
Face source (it has no step or read position), a data section whose read position means other
sequences (DataConfig.POSITION_FIELDS), a different global batch, and a dense step at or past the
MoE job's trainer.steps.
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
from sparsetron.train.config_io import from_dict, load_job_config, to_dict
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
    job: JobConfig | None = None
    """The dense run's job config (None for a Hugging Face folder)."""
    checkpoint: Path | None = None
    """The dense step folder (None for a Hugging Face folder)."""


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

    return DenseSource(job.model, job.attention, f"sparsetron checkpoint {path}", load, job, path)


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
    continue_run: bool = False,
) -> UpcycleResult:
    """Upcycle the dense model at `source` into `recipe`'s MoE and write it as `out`/step_00000000,
    or with `continue_run` as `out`/step_N holding the dense checkpoint's train state (step N)."""
    out = Path(out).expanduser()
    require_empty_folder(out, "upcycle: --out")
    job = load_job_config(recipe, overrides)
    if not job.moe.enabled:
        raise UpcycleError(f"upcycle: recipe {recipe} is dense (moe.num_experts 0); give an MoE recipe")
    # As the trainer does, so that config.yaml is what `sparsetron train RECIPE` resolves to.
    resolve_vocab(job, build_tokenizer(job.data.tokenizer).vocab_size)
    manager = CheckpointManager(out)
    dense_source = open_dense(source)
    state = continued_state(dense_source, job) if continue_run else None
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
        "continued_from_step": state["step"] if state is not None else None,
    }
    written = save_step0(
        manager,
        moe,
        job,
        after_save=lambda: (out / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n"),
        state=state,
    )
    return UpcycleResult(checkpoint=written, plan=plan, warnings=accepted)


def continued_state(dense: DenseSource, job: JobConfig) -> dict:
    """The dense checkpoint's train state, for an MoE `job` that continues the dense run; refuses
    (ConfigError naming the setting) what cannot continue. Sets `job`'s global batch to the dense
    run's, so that `train --resume` refuses a layout that would change it."""
    if dense.job is None or dense.checkpoint is None:
        raise ConfigError(
            f"upcycle --continue: {dense.origin} has no training step or data read position to continue; "
            "upcycle it without --continue (the MoE then starts its own schedule at step 0)"
        )
    old, new = to_dict(dense.job.data), to_dict(job.data)
    differ = [
        f"data.{k}: dense run {old[k]!r}, MoE recipe {new[k]!r}" for k in job.data.POSITION_FIELDS if old[k] != new[k]
    ]
    if differ:
        raise ConfigError(
            "upcycle --continue: the dense run's data read position does not index the MoE recipe's data:\n  "
            + "\n  ".join(differ)
        )
    tc = job.trainer
    batch = tc.global_batch_size or tc.micro_batch_size * tc.grad_accum_steps
    dense_batch = dense.job.trainer.global_batch_size
    if batch != dense_batch:
        raise ConfigError(
            f"upcycle --continue: trainer.global_batch_size: the dense run trained {dense_batch} sequences per step, "
            f"the MoE recipe {batch}; set trainer.global_batch_size={dense_batch} (and give it to `train` as well)"
        )
    tc.global_batch_size = dense_batch
    state = CheckpointManager(dense.checkpoint.parent).read_train_state(dense.checkpoint)
    if state["step"] >= tc.steps:
        raise ConfigError(
            f"upcycle --continue: trainer.steps: the dense run is at step {state['step']}, "
            f"the MoE recipe ends at step {tc.steps}; nothing would be left to train"
        )
    return state
