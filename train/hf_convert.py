"""`sparsetron convert`: Hugging Face checkpoint folders to sparsetron checkpoints and back.

    sparsetron convert --from ~/models/Qwen2-0.5B --to ckpt/ --format sparsetron [--set data.seq_len=1024 ...]
    sparsetron convert --from ckpt/ --to exported/ --format hf [--dtype bfloat16]

Import writes one complete checkpoint folder `<to>/step_00000000` through the ordinary
`CheckpointManager` (model, a never-stepped optimizer, a step-0 train state, config.yaml),
whose config.yaml has the imported model/attention/moe sections and checkpoint.folder = <to>:
`sparsetron train <to>/step_00000000/config.yaml --resume auto` continues from it, and any
reader of sparsetron checkpoints (the upcycler) loads it like one written by training.
Export reads a complete step folder (or the newest one under a folder) without an optimizer.
The source format is detected from the folder's contents; the target format is named.
Nothing on disk is overwritten: the target must not exist or be an empty folder.
"""

from __future__ import annotations

from pathlib import Path

from sparsetron.model.config import ConfigError
from sparsetron.model.hf import (
    CONFIG_FILE,
    DTYPES,
    config_from_hf,
    export_family,
    load_hf,
    read_hf_config,
    require_empty_folder,
    save_hf,
)
from sparsetron.model.transformer import materialised_transformer
from sparsetron.train.checkpoint import CheckpointError, CheckpointManager, is_complete, list_complete, step_of
from sparsetron.train.config import JobConfig
from sparsetron.train.config_io import apply_override, from_dict, to_dict
from sparsetron.train.step0 import save_step0

__all__ = ["FORMATS", "convert", "detect_format"]

FORMATS = ("hf", "sparsetron")
MODEL_SECTIONS = ("model", "attention", "moe")
TOKENIZER_FILE = "tokenizer.json"


def detect_format(source: Path) -> str:
    """'hf' for a folder with config.json, 'sparsetron' for a complete step folder or a folder holding one."""
    if not source.exists():
        raise ConfigError(f"convert: source {source} does not exist")
    if not source.is_dir():
        raise ConfigError(f"convert: source {source} is a file, not a checkpoint folder")
    if (source / CONFIG_FILE).is_file():
        return "hf"
    if is_complete(source) or list_complete(source):
        return "sparsetron"
    if step_of(source) is not None:
        raise CheckpointError(f"convert: source {source} is a half-written checkpoint (no .complete marker)")
    raise ConfigError(
        f"convert: source {source} is neither a Hugging Face checkpoint ({CONFIG_FILE} + safetensors) "
        "nor a sparsetron checkpoint (step_NNNNNNNN/ folders)"
    )


def convert(
    source: str | Path,
    target: str | Path,
    to_format: str,
    dtype: str | None = None,
    overrides: list[str] | None = None,
) -> Path:
    """Convert `source` (format detected) into `target` in `to_format`; returns what was written.

    `overrides` (`section.key=value`, as `sparsetron train --set`) set the other sections of an
    imported checkpoint's config.yaml (data, trainer, ...): the data settings that fix the saved
    read position must be the ones the resumed run uses. The model, attention and moe sections
    come from the Hugging Face config and are refused here.
    """
    source, target = Path(source).expanduser(), Path(target).expanduser()
    if to_format not in FORMATS:
        raise ConfigError(f"convert: --format must be one of {', '.join(FORMATS)}, got {to_format!r}")
    if dtype is not None and (to_format != "hf" or dtype not in DTYPES):
        raise ConfigError(f"convert: --dtype applies to --format hf and is one of {', '.join(DTYPES)}, got {dtype!r}")
    if overrides and to_format != "sparsetron":
        raise ConfigError("convert: --set applies to --format sparsetron (the config.yaml of the new checkpoint)")
    for item in overrides or []:
        if item.partition(".")[0].strip() in MODEL_SECTIONS:
            raise ConfigError(
                f"convert: --set {item}: the {', '.join(MODEL_SECTIONS)} sections come from the Hugging Face "
                "config; change what may change after import with `sparsetron train --set`"
            )
    kind = detect_format(source)
    if kind == to_format:
        raise ConfigError(f"convert: {source} is already a {kind} checkpoint")
    require_empty_folder(target, "convert: target")
    if to_format == "sparsetron":
        return hf_to_sparsetron(source, target, overrides or [])
    return sparsetron_to_hf(source, target, dtype)


def hf_to_sparsetron(source: Path, target: Path, overrides: list[str]) -> Path:
    _, model_cfg, attn_cfg, moe_cfg = config_from_hf(read_hf_config(source))  # the cheap checks first
    job = JobConfig(model=model_cfg, attention=attn_cfg, moe=moe_cfg)
    job.checkpoint.folder = str(target.resolve())
    tokenizer = source / TOKENIZER_FILE
    if tokenizer.is_file():
        job.data.tokenizer = str(tokenizer.resolve())
    job.data.seq_len = min(job.data.seq_len, job.model.max_seq_len)
    raw = to_dict(job)
    for item in overrides:
        apply_override(raw, item)
    job = from_dict(JobConfig, raw, "")
    job.validate()
    ckpt = load_hf(source)
    model = ckpt.build()
    return save_step0(CheckpointManager(target), model, job)


def sparsetron_to_hf(source: Path, target: Path, dtype: str | None) -> Path:
    manager = CheckpointManager(source)
    path = manager.resolve(str(source))
    try:
        job = from_dict(JobConfig, manager.read_config(path), "")
    except ConfigError as err:
        raise ConfigError(f"checkpoint {path}: its config.yaml does not load: {err}") from err
    export_family(job.model, job.attention, job.moe)  # refuse before reading any tensor
    model = materialised_transformer(job.model, job.attention, job.moe)
    manager.load(path, model)
    tokenizer = Path(job.data.tokenizer)
    if tokenizer.is_dir():
        tokenizer = tokenizer / TOKENIZER_FILE
    extra = {TOKENIZER_FILE: tokenizer} if tokenizer.name == TOKENIZER_FILE and tokenizer.is_file() else {}
    state = model.state_dict()
    return save_hf(target, job.model, job.attention, job.moe, state, dtype or "float32", extra_files=extra)
