"""metrics.wandb: the run's scalars in Weights & Biases as well as TensorBoard (rank 0 only).

wandb is an optional dependency (`pip install 'sparsetron[wandb]'`): `require_wandb` refuses
metrics.wandb without it before anything is built. The W&B run is named after the run folder
and its id is kept in <run_dir>/wandb_run_id, so that a resumed run continues the same W&B run.
With metrics.wandb_mode offline, or WANDB_MODE=offline, no network is needed: wandb writes
the run under $WANDB_DIR (default: the run folder) for a later `wandb sync`.

wandb's capture of the console is off: the live progress line redraws many times a second.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from sparsetron.model.config import ConfigError
from sparsetron.train.config import MetricsConfig

__all__ = ["ID_FILE", "WandbRun", "require_wandb"]

ID_FILE = "wandb_run_id"


def require_wandb(cfg: MetricsConfig) -> None:
    """Refuse metrics.wandb where wandb is not installed (a cheap check: nothing is imported)."""
    if cfg.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "metrics.wandb=true needs the wandb package: pip install 'sparsetron[wandb]' "
            "(or pip install wandb), or set metrics.wandb=false"
        )


class WandbRun:
    """One W&B run for the run folder `run_dir`; `resumed` continues the one whose id the folder keeps."""

    def __init__(self, cfg: MetricsConfig, run_dir: Path, config: dict[str, Any], resumed: bool):
        # Imported here: wandb is optional and takes about a second to import.
        import wandb

        id_file = run_dir / ID_FILE
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else None
        try:
            self._run = wandb.init(
                project=cfg.wandb_project,
                name=run_dir.resolve().name,
                id=run_id,
                resume="allow",
                config=config,
                dir=None if os.environ.get("WANDB_DIR") else str(run_dir),
                mode=None if cfg.wandb_mode == "auto" else cfg.wandb_mode,
                settings=wandb.Settings(console="off"),
            )
        except wandb.errors.Error as err:
            raise ConfigError(
                f"metrics.wandb: W&B did not start a run ({err}); log in with `wandb login`, "
                "or log offline with WANDB_MODE=offline or metrics.wandb_mode=offline"
            ) from err
        id_file.write_text(self._run.id + "\n")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self._run.log(scalars, step=step)

    def finish(self, failed: bool) -> None:
        self._run.finish(exit_code=1 if failed else 0)
