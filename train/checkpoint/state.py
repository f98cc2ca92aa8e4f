"""The state dicts a checkpoint holds, and whether a checkpoint's tensors fit the model before any is read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

from sparsetron.train.checkpoint.folders import CheckpointError
from sparsetron.train.checkpoint.group import _distributed, _gather

FORMAT_VERSION = 2
"""2: optimizer state keyed by parameter name (layout-independent); 1 keyed it by param group."""
# Optimizer state and hyperparameters keyed by parameter name, not by param-group index: the
# groups differ between layouts (they are split by device mesh), the names do not.
OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
# Longest list of keys quoted in one error message.
MAX_LISTED = 12


def _state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    if optimizer is None:
        return {"model": get_model_state_dict(model, options=OPTIONS)}
    model_sd, optim_sd = get_state_dict(model, optimizer, options=OPTIONS)
    return {"model": model_sd, "optim": optim_sd}


def _optimizer_is_fresh(optimizer: torch.optim.Optimizer | None) -> bool:
    return optimizer is not None and not optimizer.state


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    """Leaves of a nested state dict under DCP's own dotted names (lists index by position)."""
    if isinstance(value, dict):
        for key, child in value.items():
            _flatten(child, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for index, child in enumerate(value):
            _flatten(child, f"{prefix}.{index}", out)
    else:
        out[prefix] = value
    return out


def _check_fit(path: Path, metadata: Any, state: dict[str, Any], group: dist.ProcessGroup | None) -> None:
    """Compare key sets and global shapes with the checkpoint's metadata, before any tensor is read.

    Pipeline stages each ask for their own part of the model, so the key sets of every rank
    are pooled (one small all-gather) before judging what is missing or unexpected; every
    rank then raises the same error, or none does.
    """
    expected = _flatten(state, "", {})
    sections = tuple(f"{name}." for name in state)
    saved = {k: v for k, v in metadata.state_dict_metadata.items() if k.startswith(sections)}
    mismatched = []
    for key in sorted(expected.keys() & saved.keys()):
        want, have = expected[key], saved[key]
        want_tensor = isinstance(want, torch.Tensor)
        have_tensor = isinstance(have, TensorStorageMetadata)
        if want_tensor != have_tensor:
            mismatched.append(f"{key}: checkpoint holds {'a tensor' if have_tensor else 'a non-tensor value'}")
        elif want_tensor and tuple(want.shape) != tuple(have.size):
            mismatched.append(f"{key}: checkpoint {list(have.size)} vs model {list(want.shape)}")
    wanted = set(expected)
    if _distributed():
        pooled = _gather(group, (wanted, mismatched))
        wanted = set().union(*(keys for keys, _ in pooled))
        mismatched = sorted(set().union(*(problems for _, problems in pooled)))
    missing = sorted(k for k in wanted if k not in saved)
    unexpected = sorted(k for k in saved if k not in wanted)
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {path} does not fit the model (nothing was loaded):"]
        if mismatched:
            lines.append(f"  shape mismatch:{_listing(mismatched)}")
        if missing:
            lines.append(f"  missing from the checkpoint:{_listing(missing)}")
        if unexpected:
            lines.append(f"  unexpected in the checkpoint:{_listing(unexpected)}")
        raise CheckpointError("\n".join(lines))


def _listing(items: list[str]) -> str:
    shown = items[:MAX_LISTED] + ([f"... and {len(items) - MAX_LISTED} more"] if len(items) > MAX_LISTED else [])
    return "".join(f"\n    {item}" for item in shown)
