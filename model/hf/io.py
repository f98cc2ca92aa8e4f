"""Reading and writing Hugging Face checkpoint folders: config.json + safetensors (one file, or
shards and model.safetensors.index.json)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsetron.model.config import AttentionConfig, ModelConfig, MoEConfig
from sparsetron.model.hf.config import config_from_hf, config_to_hf, export_family
from sparsetron.model.hf.weights import HFFormatError, state_dict_from_hf, state_dict_to_hf

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class HFCheckpoint:
    """A Hugging Face checkpoint read into sparsetron terms."""

    family: str
    """config.json's model_type."""
    model: ModelConfig
    attention: AttentionConfig
    moe: MoEConfig
    state_dict: dict[str, torch.Tensor]
    """sparsetron parameter names, tensors in the dtype the files hold."""

    def build(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """A Transformer holding these weights (fp32 parameters)."""
        from sparsetron.model.transformer import materialised_transformer

        # Leave the caller's random stream where it was: every parameter is overwritten below.
        with torch.random.fork_rng(devices=[]):
            model = materialised_transformer(self.model, self.attention, self.moe, device)
        model.load_state_dict({k: v.float() for k, v in self.state_dict.items()}, strict=True)
        return model


def require_empty_folder(folder: Path, what: str) -> None:
    """FileExistsError unless `folder` is absent or an empty folder: nothing already on disk is lost."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(f"{what} {folder} exists and is not an empty folder; nothing was written")


def _read_json(file: Path) -> dict:
    try:
        value = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise HFFormatError(f"{file}: cannot read: {err}") from err
    if not isinstance(value, dict):
        raise HFFormatError(f"{file}: does not hold a JSON object")
    return value


def read_hf_config(folder: str | Path) -> dict:
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise HFFormatError(f"{folder} is not a Hugging Face checkpoint: it has no {CONFIG_FILE}")
    return _read_json(folder / CONFIG_FILE)


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if (folder / INDEX_FILE).is_file():
        weight_map = _read_json(folder / INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict):
            raise HFFormatError(f"{folder / INDEX_FILE}: has no weight_map")
        files = sorted(set(weight_map.values()))
    elif (folder / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        found = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        raise HFFormatError(
            f"{folder} holds neither {SINGLE_FILE} nor {INDEX_FILE}"
            + (f" (found {found}: only safetensors are read)" if found else "")
        )
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        if not (folder / name).is_file():
            raise HFFormatError(f"{folder}: shard {name} named by {INDEX_FILE} is missing")
        try:
            tensors.update(load_file(folder / name))
        except (SafetensorError, OSError) as err:
            raise HFFormatError(f"{folder / name}: not a readable safetensors file: {err}") from err
    return tensors


def load_hf(folder: str | Path) -> HFCheckpoint:
    """Read a local Hugging Face checkpoint folder (never the hub). Raises ConfigError for an
    option sparsetron cannot represent, HFFormatError for missing or unexpected files/tensors;
    the config is judged before any tensor is read."""
    folder = Path(folder)
    family, model, attention, moe = config_from_hf(read_hf_config(folder))
    sd = state_dict_from_hf(_read_tensors(folder), family, model, attention, moe)
    _check_shapes(sd, model, attention, moe)
    return HFCheckpoint(family, model, attention, moe, sd)


def _check_shapes(sd: dict[str, torch.Tensor], model: ModelConfig, attention: AttentionConfig, moe: MoEConfig) -> None:
    from sparsetron.model.transformer import Transformer

    with torch.device("meta"):
        expected = Transformer(model, attention, moe).state_dict()
    for name, tensor in expected.items():
        if tuple(sd[name].shape) != tuple(tensor.shape):
            raise HFFormatError(
                f"tensor for {name} has shape {list(sd[name].shape)}, config.json implies {list(tensor.shape)}"
            )


def save_hf(
    folder: str | Path,
    model: ModelConfig,
    attention: AttentionConfig,
    moe: MoEConfig,
    state_dict: dict[str, torch.Tensor],
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Write a Hugging Face checkpoint folder (config.json + model.safetensors, or shards and an
    index past `max_shard_bytes`; `extra_files` are copied in under their names, e.g. the
    tokenizer). `dtype` casts floating tensors (None keeps theirs). The folder must not exist or
    be empty; it is written whole under a temporary name and renamed into place."""
    from safetensors.torch import save_file

    folder = Path(folder)
    require_empty_folder(folder, "the export target")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    family = export_family(model, attention, moe)
    tensors = state_dict_to_hf(state_dict, family, model, attention, moe)
    cast = DTYPES.get(dtype)
    tensors = {
        k: (v.to(cast) if cast is not None and v.is_floating_point() else v).detach().cpu().contiguous().clone()
        for k, v in tensors.items()
    }
    stored = dtype or str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    cfg = config_to_hf(model, attention, moe, stored)

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp_{folder.name}_", dir=folder.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        if len(shards) == 1:
            save_file(shards[0], tmp / SINGLE_FILE, metadata={"format": "pt"})
        else:
            weight_map = {}
            for n, shard in enumerate(shards, 1):
                name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / name, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        for name, path in (extra_files or {}).items():
            shutil.copyfile(path, tmp / name)
        if folder.exists():
            folder.rmdir()  # empty, checked above
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
