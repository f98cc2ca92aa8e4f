"""Step folders on disk: their names, which are complete, reading and writing their files, the commit.

A folder named `step_*` that holds the MARKER file is complete; the package's own scratch
folders carry hidden prefixes that never match a step folder's name. Writes are synced to
disk, and a folder is renamed into place (`_commit`) only once everything in it is.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader

from sparsetron.train.checkpoint.group import _rank

MARKER = ".complete"
CONFIG_FILE = "config.yaml"
METADATA_FILE = ".metadata"
STEP_RE = re.compile(r"^step_(\d+)$")
# Hidden prefixes of this package's own scratch folders; none of them matches STEP_RE.
TMP_PREFIX = ".tmp_"
REPLACED_PREFIX = ".replaced_"
DELETING_PREFIX = ".deleting_"
INCOMPLETE_PREFIX = ".incomplete_"
ABANDONED_PREFIX = "abandoned_"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, half-written, corrupt or does not fit the model; the message names the folder."""


def step_folder_name(step: int) -> str:
    return f"step_{step:08d}"


def train_state_file(rank: int) -> str:
    return f"train_state_rank{rank}.pt"


def step_of(path: Path) -> int | None:
    """The step a `step_*` folder name encodes, else None."""
    match = STEP_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def list_complete(folder: Path) -> list[Path]:
    """Complete step folders directly under `folder`, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and step_of(p) is not None and is_complete(p)]
    return sorted(found, key=lambda p: step_of(p))


def _corrupt(path: Path, problems: list[str]) -> str:
    return f"checkpoint {path} does not verify against its {MARKER} marker: " + "; ".join(problems)


def _half_written(path: Path) -> str:
    return (
        f"checkpoint {path} lacks the {MARKER} marker: it is half-written (its save was interrupted) "
        "and cannot be loaded; resume from another step folder or 'auto'"
    )


# ---- reading files -------------------------------------------------------------------


def _read_marker(path: Path) -> dict[str, Any]:
    try:
        marker = json.loads((path / MARKER).read_text())
        if not isinstance(marker, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: marker file {MARKER} is unreadable: {err}") from err
    return marker


def _read_train_state(path: Path) -> dict[str, Any]:
    file = path / train_state_file(_rank())
    if not file.is_file():
        file = path / train_state_file(0)
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path}: file {file.name} is missing")
    try:
        # Our own file: it holds arbitrary Python objects, hence weights_only=False.
        state = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path}: file {file.name} is corrupt or truncated: {err}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: file {file.name} does not hold a dict")
    return state


def _read_metadata(path: Path) -> Any:
    try:
        return FileSystemReader(str(path)).read_metadata()
    except Exception as err:
        raise CheckpointError(f"checkpoint {path}: file {METADATA_FILE} is corrupt or missing: {err}") from err


# ---- writing files -------------------------------------------------------------------


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _write_bytes(file: Path, data: bytes) -> None:
    with open(file, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _write_marker(folder: Path, marker: dict[str, Any]) -> None:
    _write_bytes(folder / MARKER, json.dumps(marker, indent=1).encode())


def _fsync_dir(folder: Path) -> None:
    # A rename is durable only once its directory is synced; some platforms cannot open directories.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, final: Path) -> None:
    """Rename a finished temporary folder into place, keeping any older complete copy until then."""
    replaced = None
    if final.exists():
        if is_complete(final):
            replaced = final.with_name(f"{REPLACED_PREFIX}{final.name}")
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            # Not ours to delete: move the stranger aside, keeping its contents.
            replaced_name = f"{INCOMPLETE_PREFIX}{final.name}_{time.strftime('%Y%m%d-%H%M%S')}"
            warnings.warn(f"{final} had no {MARKER} marker; moved it to {replaced_name}", stacklevel=3)
            final.rename(final.with_name(replaced_name))
        if replaced is not None:
            final.rename(replaced)
    tmp.rename(final)
    _fsync_dir(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
