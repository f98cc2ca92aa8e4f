"""Training runs the distributed layout tests compare: a small MoE recipe, trained a few steps
at a layout on spawned ranks or in one process, and the comparisons between them.

One process reads micro-batches of GLOBAL_BATCH sequences; a layout with `dp` data ranks
gives each GLOBAL_BATCH / dp of them (their slices of the same global batch), and its tensor,
expert, context and pipeline ranks share their data rank's slice.

`TrainedLayouts` trains every layout of one world size in one spawn, one Trainer after another
on the same process group (a spawn of four ranks costs seconds on two cores), including the
checkpoint moves between layouts.
"""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from sparsetron.train.config_io import load_job_config
from sparsetron.train.trainer import Trainer

STEPS = 3
GLOBAL_BATCH = 4
BF16 = ["trainer.precision=bf16"]  # what a GPU runs by default (precision auto)
RECIPE = "debug-deepseek"


def job(run_dir, dp, *overrides, recipe=RECIPE, save=False):
    """The run's config. Only a run that something reads a checkpoint of saves one (`save`: at its
    end, also when stopped at trainer.stop_at): a save costs about as much as the three steps."""
    # Evaluation reads eval_batches micro-batches on every rank: dp of GLOBAL_BATCH / dp
    # sequences, one of GLOBAL_BATCH in one process, so both evaluate the same sequences.
    return load_job_config(
        recipe,
        [
            "model.n_layers=4",
            f"trainer.steps={STEPS}",
            f"trainer.micro_batch_size={GLOBAL_BATCH // dp}",
            "trainer.grad_accum_steps=2",
            "trainer.eval_interval=0",
            f"trainer.eval_batches={dp}",
            "schedule.warmup_steps=1",
            "optimizer.lr=1e-3",
            "optimizer.eps=1e-6",
            "checkpoint.interval=0",
            f"checkpoint.save_final={str(save).lower()}",
            "metrics.console=none",
            f"trainer.run_dir={run_dir}",
            *overrides,
        ],
    )


def full_parameters(model):
    """Every parameter this rank's model holds, gathered whole (a collective within its stage)."""
    return {
        # Activation checkpointing's wrapper adds a prefix to names (not to state-dict keys).
        name.replace("_checkpoint_wrapped_module.", ""): (p.full_tensor() if isinstance(p, DTensor) else p)
        .detach()
        .clone()
        for name, p in model.named_parameters()
    }


class RecordingLoader:
    """A trainer's loader that appends each step's sequences this rank reads (a digest of each
    one's token ids) to <run_dir>/data.rank<R>.jsonl, for `step_data`."""

    def __init__(self, trainer: Trainer):
        self.trainer, self.loader = trainer, trainer.loader
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.path = Path(trainer.job.trainer.run_dir) / f"data.rank{rank}.jsonl"

    def __next__(self):
        micro_batches = next(self.loader)
        digests = [hashlib.sha1(row.numpy().tobytes()).hexdigest() for b in micro_batches for row in b.tokens]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": self.trainer.step + 1, "sequences": digests}) + "\n")
        return micro_batches

    def __getattr__(self, name):
        return getattr(self.loader, name)


def recorded(trainer: Trainer) -> Trainer:
    trainer.loader = RecordingLoader(trainer)
    return trainer


def step_data(run_dir) -> dict[int, list[str]]:
    """Every step's sequences (their digests, sorted) read by all the ranks that trained in `run_dir`."""
    steps: dict[int, list[str]] = {}
    for path in Path(run_dir).glob("data.rank*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            steps.setdefault(record["step"], []).extend(record["sequences"])
    return {step: sorted(digests) for step, digests in sorted(steps.items())}


def train_worker(run_dir, dp, overrides, resume=None, recipe=RECIPE, save=False):
    trainer = recorded(Trainer(job(run_dir, dp, *overrides, recipe=recipe, save=save), resume=resume))
    result = trainer.run()
    # The plan counts exactly what this rank holds between steps, sharded: FSDP2 keeps the root
    # module's parameters gathered after a forward with no backward (the last evaluation).
    for module in trainer.model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in trainer.model.parameters())
    assert trainer.memory_plan.parameters == local, (trainer.memory_plan.parameters, local)
    return result.losses, result.eval_losses, full_parameters(trainer.model)


ENTROPY = "attention/"


def expert_loads(run_dir):
    """Tokens per expert of every MoE layer in the last step rank 0 logged (metrics.jsonl), and each
    layer's sampled attention entropy at every step that logged one (metrics.attention_entropy_interval),
    keyed "<metric>@<step>"."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "loss" in r][-1]
    logged = {key: value for key, value in last.items() if key.endswith("tokens_per_expert")}
    for record in records:
        logged |= {f"{key}@{record['step']}": v for key, v in record.items() if key.startswith(ENTROPY)}
    return logged


def single_process(run_dir, *overrides, resume=None, recipe=RECIPE, save=False):
    trainer = recorded(Trainer(job(run_dir, 1, *overrides, recipe=recipe, save=save), resume=resume))
    result = trainer.run()
    return result.losses, result.eval_losses, full_parameters(trainer.model), expert_loads(run_dir)


def assert_same_training(parallel, single, load_flips=0):
    """Losses, eval losses and parameters within 1e-5 relative; every layer's expert load in the
    last step equal, or off by at most `load_flips` assignments that moved to another expert
    (a routing near-tie that rounding-level differences in the parameters may tip)."""
    losses, eval_losses, params, loads = parallel
    ref_losses, ref_eval, ref_params, ref_loads = single
    # Every layer's expert load summed over all ranks, whichever stage holds the layer, as one process counts it.
    assert loads.keys() == ref_loads.keys() and ref_loads
    for layer, ref in ref_loads.items():
        if layer.startswith(ENTROPY):  # a sampled attention entropy, summed over ranks as one process has it
            assert loads[layer] == pytest.approx(ref, rel=1e-5), layer
            continue
        moved = sum(abs(a - b) for a, b in zip(loads[layer], ref, strict=True)) / 2
        assert sum(loads[layer]) == sum(ref) and moved <= load_flips, (layer, loads[layer], ref)
    assert losses.keys() == ref_losses.keys()
    for step, loss in ref_losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), step
    for step, loss in ref_eval.items():
        assert eval_losses[step] == pytest.approx(loss, rel=1e-5), step
    assert params.keys() == ref_params.keys()
    for name, ref in ref_params.items():
        torch.testing.assert_close(params[name], ref, rtol=1e-5, atol=1e-5, msg=name)


def rms(t):
    return t.double().square().mean().sqrt().item()


def bf16_tolerances(bf16, fp32):
    """What bf16 itself costs, from one process: the largest change of any step's loss, and the
    root-mean-square change of each parameter after the steps, between a bf16 and an fp32 run.
    A layout in bf16 may differ from one process in bf16 by reduction order and rounding, never by
    more than a small multiple of this. (Per parameter, not per element: AdamW's first steps move
    an element by about lr x the sign of its gradient, so rounding that flips a near-zero gradient
    moves that element by 2 lr in any run; a mean over the tensor is what rounding sets.)"""
    losses, _, params, _ = bf16
    ref_losses, _, ref_params, _ = fp32
    loss_tol = max(abs(losses[step] - ref_losses[step]) for step in ref_losses)
    params, ref_params = pooled(params), pooled(ref_params)
    param_tol = {name: rms(params[name] - ref) for name, ref in ref_params.items()}
    return loss_tol, param_tol


SCALARS = "<every one-element parameter>"


def pooled(params: dict) -> dict:
    """`params` with every one-element parameter (sigmaReparam's gammas) pooled into one tensor,
    SCALARS: the root-mean-square change of a single element is one draw of how rounding tipped
    its few AdamW updates, not a measure of what rounding does, which a mean over many elements
    is (see `bf16_tolerances`)."""
    out = {name: p for name, p in params.items() if p.numel() > 1}
    scalars = [params[name].reshape(1) for name in sorted(params) if params[name].numel() == 1]
    if scalars:
        out[SCALARS] = torch.cat(scalars)
    return out


def assert_within_bf16_error(parallel, single, fp32, multiple=2):
    """A bf16 run against one process in bf16, within `multiple` x what bf16 itself costs there."""
    loss_tol, param_tol = bf16_tolerances(single, fp32)
    assert loss_tol > 0 and min(param_tol.values()) > 0  # bf16 did change every number
    losses, eval_losses, params, _ = parallel
    ref_losses, ref_eval, ref_params, _ = single
    assert losses.keys() == ref_losses.keys()
    for step, loss in ref_losses.items():
        assert abs(losses[step] - loss) <= multiple * loss_tol, (step, losses[step], loss, loss_tol)
    for step, loss in ref_eval.items():
        assert abs(eval_losses[step] - loss) <= multiple * loss_tol, (step, eval_losses[step], loss, loss_tol)
    assert params.keys() == ref_params.keys()
    assert all(p.dtype == torch.float32 for p in params.values())  # master weights stay fp32
    params, ref_params = pooled(params), pooled(ref_params)
    for name, ref in ref_params.items():
        error = rms(params[name] - ref)
        assert error <= multiple * param_tol[name], (name, error, param_tol[name])


@dataclass
class Layout:
    """A layout to train: its world size, data-parallel degree and overrides of `recipe`."""

    world: int
    dp: int
    overrides: list[str]
    recipe: str = RECIPE
    save: bool = False
    """Save a checkpoint at the end: each base layout does once (its save path runs), not its variants."""


@dataclass
class _Run:
    run_dir: str
    dp: int
    overrides: list[str]
    resume: str | None = None
    recipe: str = RECIPE
    extra: list[str] = field(default_factory=list)
    save: bool = False


def several_worker(runs):
    """Train each run in turn on this process group; per run this rank's (losses, eval losses, parameters)."""
    return [train_worker(r.run_dir, r.dp, [*r.overrides, *r.extra], r.resume, r.recipe, r.save) for r in runs]


def merged(per_rank, run_dir):
    """One layout's result from its ranks' (losses, eval losses, parameters gathered whole)."""
    params = {}
    for _, _, rank_params in per_rank:  # pipeline stages each hold their own part
        params.update(rank_params)
    losses, eval_losses, _ = per_rank[-1]  # the last rank holds the last stage
    assert all(r[0] == losses and r[1] == eval_losses for r in per_rank), "ranks report different losses"
    return losses, eval_losses, params, expert_loads(run_dir)


class TrainedLayouts:
    """Results of `layouts` (name -> Layout) trained, and of `reshards` (name -> (source, target),
    layout names or None for one process): the source trains two steps and writes a checkpoint,
    the target resumes it for the third (a target of world 1 in this process). Every run of one
    world size trains in one spawn, on first use; a source's results are "<name> (source)".
    """

    def __init__(self, tmp_path_factory, layouts: dict[str, Layout], reshards: dict | None = None, timeout=1800):
        self.tmp = tmp_path_factory
        self.layouts = layouts
        self.reshards = reshards or {}
        self.timeout = timeout
        self.results: dict[str, tuple] = {}
        self.trained_worlds: set[int] = set()
        self.checkpoints: dict[str, str] = {}

    def world(self, name):
        return self.layouts[name].world if name is not None else 1

    def __getitem__(self, name: str):
        world = max(map(self.world, self.reshards[name])) if name in self.reshards else self.layouts[name].world
        for w in sorted({*(lay.world for lay in self.layouts.values()), 1}):
            if w <= world:
                self._train(w)
        return self.results[name]

    def _run(self, layout: str, run_dir: str | None = None, **kw) -> _Run:
        lay = self.layouts[layout]
        kw.setdefault("save", lay.save)
        return _Run(run_dir or str(self.tmp.mktemp(layout)), lay.dp, lay.overrides, recipe=lay.recipe, **kw)

    def _train(self, world: int) -> None:
        if world in self.trained_worlds:
            return
        self.trained_worlds.add(world)
        runs: dict[str, _Run] = {}
        if world > 1:
            runs = {name: self._run(name) for name, lay in self.layouts.items() if lay.world == world}
        for name, (source, target) in self.reshards.items():
            if self.world(source) == world:
                run_dir = str(self.tmp.mktemp("reshard"))
                self.checkpoints[name] = run_dir
                if source is None:
                    single_process(run_dir, "trainer.stop_at=2", save=True)
                else:
                    runs[f"{name} (source)"] = self._run(source, run_dir, extra=["trainer.stop_at=2"], save=True)
            if self.world(target) == world > 1:
                runs[name] = self._run(target, self.checkpoints[name], resume="auto")
        if runs:
            per_rank = run_distributed(several_worker, world, list(runs.values()), timeout=self.timeout)
            for i, (name, run) in enumerate(runs.items()):
                self.results[name] = merged([rank_results[i] for rank_results in per_rank], run.run_dir)
        for name, (source, target) in self.reshards.items():
            if self.world(target) == 1 and self.world(source) == world:
                lay = self.layouts[target] if target is not None else Layout(1, 1, [])
                self.results[name] = single_process(
                    self.checkpoints[name], *lay.overrides, resume="auto", recipe=lay.recipe
                )


def assert_resumed_like_straight(resumed, straight):
    """The third step resumed from a checkpoint written after two equals the straight run."""
    assert resumed[0].keys() == {STEPS}
    assert resumed[0][STEPS] == pytest.approx(straight[0][STEPS], rel=1e-5)
    for name, ref in straight[2].items():
        torch.testing.assert_close(resumed[2][name], ref, rtol=1e-5, atol=1e-5, msg=name)
