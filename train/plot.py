"""`sparsetron plot`: PNGs of a run's curves from its metrics.jsonl (train/metrics.py writes it).

    sparsetron plot runs/tiny                 # writes runs/tiny/plots/*.png
    sparsetron plot runs/tiny --out figures/

    loss.png          training loss and eval loss over steps
    lr.png            learning rate
    grad_norm.png     gradient norm before clipping (log scale)
    expert_load.png   per MoE layer, tokens per expert over steps as a heatmap, each step's load
                      divided by its mean over experts (1 = uniform); not drawn for a dense run

metrics.jsonl holds one JSON object per logged step and kind (training scalars with the MoE
histograms, or an eval loss). A resumed run appends to it: a value logged at a step that an
earlier attempt had already passed replaces that attempt's values from there on, as
TensorBoard's purge_step does. Drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from sparsetron.train.metrics import JSONL_FILE

__all__ = ["PlotError", "Plots", "plot_run", "read_series", "relative_load"]

PLOTS_DIR = "plots"
LOAD_KEY = re.compile(r"^moe/layer(\d+)/tokens_per_expert$")
DPI = 110


class PlotError(ValueError):
    """Bad input to `sparsetron plot`: the message is the one line the command prints."""


@dataclass
class Plots:
    """What `plot_run` wrote, and what it could not draw."""

    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [f"wrote {path}" for path in self.written] + self.notes


def read_series(path: Path) -> dict[str, dict[int, float | list[float]]]:
    """Every metric of `path` (a metrics.jsonl) as {name: {step: value}}, in step order; null
    values (non-finite) are left out. A last line cut short (a run still writing) is ignored."""
    series: dict[str, dict[int, float | list[float]]] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError) as err:
            if number == len(lines):
                break
            raise PlotError(f"{path}, line {number}: not a metrics record ({err})") from err
        for name, value in record.items():
            if name in ("step", "time") or value is None:
                continue
            values = series.setdefault(name, {})
            # A step this metric has passed already: a resumed attempt rewrites from here.
            for later in [s for s in values if s >= step]:
                del values[later]
            values[step] = value
    return series


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Plots:
    """Draw the PNGs the module docstring lists from `run_dir`/metrics.jsonl into `out`
    (default `run_dir`/plots); raises PlotError on bad input before anything is written."""
    run_dir = Path(run_dir).expanduser()
    metrics = run_dir / JSONL_FILE
    if not run_dir.is_dir():
        raise PlotError(f"run folder {run_dir} {'is a file' if run_dir.exists() else 'does not exist'}")
    if not metrics.is_file():
        raise PlotError(f"{run_dir} holds no {JSONL_FILE} (not a run folder, or metrics.jsonl was false)")
    try:
        import matplotlib
    except ImportError as err:
        raise PlotError("sparsetron plot needs matplotlib: pip install matplotlib") from err
    matplotlib.use("Agg")
    series = read_series(metrics)
    scalars = [name for name in ("loss", "eval/loss", "lr", "grad_norm") if series.get(name)]
    if not scalars:
        raise PlotError(f"{metrics} holds no loss, eval/loss, lr or grad_norm values yet")
    folder = Path(out).expanduser() if out is not None else run_dir / PLOTS_DIR
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return _draw(series, folder, run_dir.resolve().name)
    except OSError as err:
        raise PlotError(f"cannot write the plots into {folder}: {err.strerror or err}") from err


def _draw(series: dict, folder: Path, title: str) -> Plots:
    """Each PNG whose metrics `series` holds, into `folder`, titled `title` (the run folder's name)."""
    plots = Plots()
    if series.get("loss") or series.get("eval/loss"):
        plots.written.append(
            _lines(
                folder / "loss.png", title, "loss", [("train", series.get("loss")), ("eval", series.get("eval/loss"))]
            )
        )
    if series.get("lr"):
        plots.written.append(_lines(folder / "lr.png", title, "learning rate", [("lr", series["lr"])]))
    if series.get("grad_norm"):
        plots.written.append(
            _lines(folder / "grad_norm.png", title, "gradient norm", [("grad norm", series["grad_norm"])], log=True)
        )
    loads = {int(m.group(1)): series[name] for name in series if (m := LOAD_KEY.match(name))}
    if loads:
        plots.written.append(_expert_load(folder / "expert_load.png", title, dict(sorted(loads.items()))))
    else:
        plots.notes.append("no expert-load heatmap: the run logged no tokens per expert (a dense model)")
    return plots


def _lines(path: Path, title: str, ylabel: str, curves: list, log: bool = False) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), layout="constrained")
    for label, values in curves:
        if values:
            steps = list(values)
            ax.plot(steps, [values[s] for s in steps], label=label, marker="o" if len(steps) < 30 else None)
    ax.set(xlabel="step", ylabel=ylabel, title=f"{title}: {ylabel}")
    if log:
        ax.set_yscale("log")
    if len(curves) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _expert_load(path: Path, title: str, loads: dict[int, dict[int, list[float]]]) -> Path:
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    panels = [(layer, list(by_step), relative_load(by_step)) for layer, by_step in loads.items()]
    top = max(2.0, max(float(load.max()) for _, _, load in panels))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=top)
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(6.4, 1.2 + 1.6 * len(panels)), squeeze=False, sharex=True, layout="constrained"
    )
    for ax, (layer, steps, load) in zip(axes[:, 0], panels, strict=True):
        image = ax.pcolormesh(_edges(steps), np.arange(load.shape[0] + 1) - 0.5, load, cmap="RdBu_r", norm=norm)
        ax.invert_yaxis()
        ax.set_ylabel(f"layer {layer}\nexpert")
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title(f"{title}: tokens per expert / mean (1 = uniform)")
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="load", shrink=0.9)
    return _save(fig, path)


def relative_load(by_step: dict[int, list[float]]):
    """[experts, steps] tokens per expert at each step divided by that step's mean over experts."""
    import numpy as np

    counts = np.array(list(by_step.values()), dtype=np.float64).T
    mean = counts.mean(axis=0, keepdims=True)
    return np.divide(counts, mean, out=np.ones_like(counts), where=mean > 0)


def _edges(steps: list[int]) -> list[float]:
    """Cell edges around each logged step: halfway to its neighbours (steps may be spaced unevenly)."""
    if len(steps) == 1:
        return [steps[0] - 0.5, steps[0] + 0.5]
    middles = [(a + b) / 2 for a, b in zip(steps, steps[1:], strict=False)]
    return [2 * steps[0] - middles[0], *middles, 2 * steps[-1] - middles[-1]]


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    try:
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)
    return path
