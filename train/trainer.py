"""The training loop: build everything from a JobConfig, train, evaluate, checkpoint, resume.

Launch: `sparsetron train tiny` (see launch/cli.py), or from Python
`Trainer(load_job_config("tiny")).run()`.

Cheap checks come first (config, that the run and checkpoint folders can be written, tokenizer,
the run folder's lock, checkpoint to resume, disk space for a checkpoint, data paths), so bad
input fails before the model is built; a refused run removes its lock and any folder it made.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from sparsetron.model.attention import set_full_attention
from sparsetron.model.attention_entropy import set_entropy_probes
from sparsetron.model.config import ConfigError
from sparsetron.model.moe.balancing import moe_load_histograms, moe_metrics
from sparsetron.model.mtp import mtp_metrics
from sparsetron.model.params import num_params
from sparsetron.model.transformer import Transformer
from sparsetron.parallel.init import SingleProcessInit
from sparsetron.parallel.parallelize import parallelize
from sparsetron.parallel.precision import Precision
from sparsetron.parallel.sigma_reparam import init_sigma_reparam
from sparsetron.parallel.step import StepRunner
from sparsetron.train.checkpoint import CheckpointError, CheckpointManager, step_folder_name
from sparsetron.train.checkpoint.disk_space import checkpoint_bytes
from sparsetron.train.config import JobConfig
from sparsetron.train.config_io import dump_yaml, to_dict
from sparsetron.train.data import build_tokenizer, build_training_data
from sparsetron.train.distributed import (
    local_device,
    process_group,
    rank,
    set_collective_timeout,
    world_size_from_env,
)
from sparsetron.train.flops import mfu, model_flops_per_token, peak_tflops
from sparsetron.train.global_batch import describe_global_batch
from sparsetron.train.layout import rank_memory_plan, resolve_layout
from sparsetron.train.memory_fit import check_plan_fits, is_out_of_memory, out_of_memory
from sparsetron.train.metrics import MetricsLogger, memory_stats
from sparsetron.train.optim import build_optimizer
from sparsetron.train.profiling import StepProfiler
from sparsetron.train.progress import Progress
from sparsetron.train.resume import compare_with_checkpoint, set_rng_state, train_state
from sparsetron.train.run_folder import RunLock, check_writable
from sparsetron.train.schedule import build_scheduler
from sparsetron.train.wandb_run import require_wandb
from sparsetron.train.watchdog import Watchdog

# Signals that stop a run at the end of the current step, with a save: SIGTERM (torchrun, a
# scheduler), SIGINT (Ctrl-C), SIGUSR1 (SLURM's warning before preemption or the time limit).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
STATUS_FILE = "status.json"


class TrainingDiverged(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient norm."""


@dataclass
class TrainResult:
    """What a run did, for the CLI and for tests."""

    step: int
    tokens_seen: int
    losses: dict[int, float] = field(default_factory=dict)
    """Training loss of every step taken in this process, by step number (1-based)."""
    eval_losses: dict[int, float] = field(default_factory=dict)
    """Validation loss by the step after which it was measured (0 = before training)."""
    skipped_steps: int = 0
    stopped_early: bool = False
    stopped_by: str | None = None
    """Why the run stopped before trainer.steps: "signal SIGTERM", "trainer.max_hours", "trainer.stop_at"."""
    checkpoint: Path | None = None


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device: 'cuda' was asked for but no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def resolve_vocab(job: JobConfig, tokenizer_vocab: int) -> None:
    """Fill model.vocab_size from the tokenizer (rounded up to 64) or check it is large enough."""
    if job.model.vocab_size == 0:
        job.model.vocab_size = -(-tokenizer_vocab // 64) * 64
    elif job.model.vocab_size < tokenizer_vocab:
        raise ConfigError(
            f"model.vocab_size={job.model.vocab_size} is smaller than the tokenizer's {tokenizer_vocab} tokens"
        )


class Trainer:
    """One training run of `job`, optionally resumed (`resume` = "auto" or a checkpoint folder);
    `force` starts it even when the memory plan exceeds the device's memory (with a warning)."""

    def __init__(self, job: JobConfig, resume: str | None = None, force: bool = False):
        self.job = job
        self.force = force
        require_wandb(job.metrics)
        self._started = time.monotonic()  # trainer.max_hours counts from here
        # The layout is checked before any process group exists.
        # From here on trainer.grad_accum_steps and global_batch_size hold what this layout trains.
        self.global_batch_from_layout = job.trainer.global_batch_size == 0
        self.dims = resolve_layout(job, world_size_from_env())
        # Every rank writes its checkpoint shard; rank 0 also the run folder's files.
        check_writable(job.trainer.run_dir, "trainer.run_dir")
        check_writable(job.checkpoint_folder(), "checkpoint.folder")
        self.device = local_device(resolve_device(job.trainer.device).type)
        self.precision = Precision.from_config(job.trainer.precision, self.device)
        self.tokenizer = build_tokenizer(job.data.tokenizer)
        resolve_vocab(job, self.tokenizer.vocab_size)
        self._closing = contextlib.ExitStack()
        self._closing.enter_context(process_group(self.device, job.parallel.init_timeout_s))
        # A trainer that is built but never run still releases its process group, at the
        # latest when the interpreter exits (before torch's modules are torn down).
        weakref.finalize(self, self._closing.close)
        self.watchdog = None
        try:
            if dist.is_initialized():
                self.watchdog = Watchdog(job.parallel.step_timeout_s)
                self._closing.callback(self.watchdog.close)
            with self._explained_collective_failures():
                self._build(resume)
        except BaseException:
            # Hand the exception to the process-group context: a failed rank must exit at
            # once (torchrun then stops the others), not wait in the normal-end barrier.
            if not self._closing.__exit__(*sys.exc_info()):
                raise

    def close(self) -> None:
        """Release the process group this trainer created (run() does it when it ends)."""
        self._closing.close()

    def _build(self, resume: str | None) -> None:
        job = self.job
        self.mesh = self.dims.build_mesh(self.device.type) if dist.is_initialized() else None
        # The mesh's groups start with torch's default timeouts; start-up runs under init_timeout_s.
        set_collective_timeout(job.parallel.init_timeout_s)
        self.is_main = rank() == 0
        # Held from before anything in the run folder is touched (the checkpoints' recovery too).
        lock = self._closing.enter_context(RunLock(job.trainer.run_dir)) if self.is_main else None
        self.run_folder_notes = [lock.notice] if lock is not None and lock.notice else []

        cc = job.checkpoint
        self.checkpoints = CheckpointManager(
            job.checkpoint_folder(), cc.keep_last, cc.on_corrupt, cc.async_save, job.parallel.init_timeout_s
        )
        self.resume_requested = bool(resume)
        # Verified before anything is loaded; messages say what a fallback skipped.
        point = self.checkpoints.find_resume(resume or "none")
        self.resume_from, self.resume_messages = point.path, point.messages
        self.changed_settings: list[str] = []
        if self.resume_from is not None:
            saved = self.checkpoints.read_config(self.resume_from)
            self.changed_settings = compare_with_checkpoint(job, saved, self.resume_from, self.global_batch_from_layout)
        elif not resume and self.checkpoints.latest() is not None:
            raise CheckpointError(
                f"{self.checkpoints.folder} already holds checkpoints (newest: {self.checkpoints.latest().name}); "
                "continue that run with --resume auto, or start a new one in another trainer.run_dir"
            )
        if cc.interval or cc.save_final:
            # Before the data is read: the size needs only the parameter count of the model on the meta device.
            with torch.device("meta"):
                parameters = num_params(Transformer(job.model, job.attention, job.moe))
            self.checkpoints.require_space(checkpoint_bytes(parameters))

        tc = job.trainer
        dp_rank = self.mesh["dp"].get_local_rank() if self.mesh is not None else 0
        # micro_batch_size is per rank: each data-parallel rank reads its own slice of every global batch.
        # Every rank evaluates the same batches with the same weights, so no reduction is needed.
        self.data = build_training_data(
            job.data, self.tokenizer, tc.micro_batch_size, tc.eval_batches, dp_rank, self.dims.dp, tc.grad_accum_steps
        )
        self.loader, self.eval_set = self.data.loader, self.data.eval_set

        torch.manual_seed(tc.seed)
        with torch.device("meta"):
            self.model = Transformer(job.model, job.attention, job.moe)
        self.pipeline_split = parallelize(
            self.model, job.parallel, self.dims, self.mesh, job.data.seq_len, self.precision
        )
        self.memory_plan = rank_memory_plan(self.model, job, self.dims, self.precision, self.device)
        warning = check_plan_fits(self.memory_plan, self.device, self.force)
        if warning is not None and self.is_main:
            print(f"warning: {warning}", file=sys.stderr)
        self.model.to_empty(device=self.device)
        split = self.pipeline_split
        with (
            torch.no_grad(),
            split.whole_model(self.model) if split is not None else nullcontext(),
            SingleProcessInit(self.device) if self.mesh is not None else nullcontext(),
        ):
            self.model.init_weights()
        if job.model.sigma_reparam:
            init_sigma_reparam(self.model)
        self.runner = StepRunner(
            self.model,
            split,
            self.mesh,
            self.dims,
            self.precision,
            tc.grad_accum_steps,
            tc.micro_batch_size,
            job.data.seq_len,
            self.device,
        )

        self.optimizer = build_optimizer(self.model, job.optimizer)
        self.scheduler = build_scheduler(self.optimizer, job.schedule, tc.steps)
        self.step = 0
        self.tokens_seen = 0
        self.nonfinite_in_a_row = 0
        self.skipped_steps = 0
        self.probed = False
        """Whether the last step recorded attention entropy (metrics.attention_entropy_interval)."""
        self.last_lr = self.scheduler.get_last_lr()[0]
        self.set_aside: list[Path] = []
        if self.resume_from is not None:
            self._load(self.resume_from)
            self.set_aside = self.checkpoints.set_aside_after(self.step)

        self.tokens_per_step = tc.global_batch_size * job.data.seq_len
        # MoBA layers attend fewer keys until the schedule switches them to full attention.
        self.flops_per_token_moba, self.flops_per_token_full = (
            model_flops_per_token(job.model, job.attention, job.moe, job.data.seq_len, moba) for moba in (True, False)
        )
        self.flops_per_token = self.flops_per_token_moba
        self.peak_tflops = job.metrics.peak_tflops or peak_tflops(self.device)
        self._stop_requested: str | None = None
        # attention.moba_full_after: the first step whose MoBA layers run full attention (None = never).
        self.full_attention_from = job.attention.moba_switch_step(tc.steps)

    # ---- state --------------------------------------------------------------------------

    def _train_state(self) -> dict:
        return train_state(
            self.step, self.tokens_seen, self.nonfinite_in_a_row, self.skipped_steps, self.loader.state_dict()
        )

    def _load(self, path: Path) -> None:
        # Hyperparameters come from this job's config, not the checkpoint: a resumed run may
        # change its learning rate, betas, weight decay or schedule on purpose.
        configured = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        state = self.checkpoints.load(path, self.model, self.optimizer)
        for group, settings in zip(self.optimizer.param_groups, configured, strict=True):
            group.update(settings)
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.nonfinite_in_a_row = state["nonfinite_in_a_row"]
        self.skipped_steps = state["skipped_steps"]
        self.scheduler = build_scheduler(self.optimizer, self.job.schedule, self.job.trainer.steps, self.step)
        self.loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])

    def save(self) -> Path:
        with self._checkpoint_phase(f"saving step {self.step}"):
            return self.checkpoints.save(
                self.step, self.model, self.optimizer, self._train_state(), dump_yaml(self.job)
            )

    # ---- one step ---------------------------------------------------------------------

    def _set_attention_mode(self, step: int) -> None:
        """MoBA or full attention in the MoBA layers (and the FLOPs per token MFU counts), as the
        schedule has it for 0-based step `step`.

        A function of the step number alone, so a resumed run attends as the straight run did.
        """
        if self.full_attention_from is None:
            return
        full = step >= self.full_attention_from
        set_full_attention(self.model, full)
        self.flops_per_token = self.flops_per_token_full if full else self.flops_per_token_moba

    def _phase(self, name: str) -> None:
        if self.watchdog is not None:
            self.watchdog.phase(name)

    @contextmanager
    def _explained_collective_failures(self):
        """Turn a collective's timeout or broken connection into an error naming the collective and
        the ranks that did not reach it (see train/watchdog.py)."""
        try:
            yield
        except RuntimeError as err:
            if self.watchdog is not None and (isinstance(err, dist.DistError) or "gloo" in str(err)):
                raise self.watchdog.diagnose(err) from err
            raise

    @contextmanager
    def _checkpoint_phase(self, name: str):
        """Saving runs under parallel.init_timeout_s: a rank may write its files for longer than a step takes."""
        self._phase(name)
        set_collective_timeout(self.job.parallel.init_timeout_s)
        try:
            yield
        finally:
            self._set_step_timeout()
        self._phase(f"after step {self.step}")

    def _set_step_timeout(self) -> None:
        """parallel.step_timeout_s on the training collectives; the checkpoints' own group keeps
        init_timeout_s, since a background save may write for longer than a step takes."""
        seconds = self.watchdog.backend_timeout if self.watchdog is not None else self.job.parallel.step_timeout_s
        set_collective_timeout(seconds, skip=(self.checkpoints.group,))

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over grad_accum_steps micro-batches: (loss, grad norm)."""
        self._phase(f"step {self.step + 1}")
        self._set_attention_mode(self.step)
        interval = self.job.metrics.attention_entropy_interval
        self.probed = bool(interval) and (self.step + 1) % interval == 0
        set_entropy_probes(self.model, self.probed)
        micro_batches = next(self.loader)
        loss_value, grad_norm = self.runner.train_step(micro_batches, self.job.optimizer.grad_clip)
        self.last_lr = self.scheduler.get_last_lr()[0]
        applied = math.isfinite(loss_value) and math.isfinite(grad_norm)
        if applied:
            self.optimizer.step()
            self.nonfinite_in_a_row = 0
        else:
            # The batch is consumed and the schedule advances, so a resumed run stays aligned.
            self.nonfinite_in_a_row += 1
            self.skipped_steps += 1
        self.runner.close_step(applied)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        self._phase(f"after step {self.step}")
        return loss_value, grad_norm

    def _should_stop(self) -> bool:
        """Whether any rank was asked to stop, or the time limit is reached: all ranks must leave the
        loop at the same step (rank 0's clock decides the time limit)."""
        max_hours = self.job.trainer.max_hours
        if (
            max_hours
            and self.is_main
            and self._stop_requested is None
            and time.monotonic() - self._started >= max_hours * 3600
        ):
            self._stop_requested = "trainer.max_hours"
        return self.runner.any_rank(self._stop_requested is not None)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean cross-entropy over the fixed validation batches, attending as the last step trained
        (or the first step, before any)."""
        self._set_attention_mode(max(self.step - 1, 0))
        self._phase(f"evaluation after step {self.step}")
        loss = self.runner.eval_loss(self.eval_set)
        self._phase(f"after step {self.step}")
        return loss

    # ---- the loop -----------------------------------------------------------------------

    def _request_stop(self, signum, frame) -> None:
        # The first stop signal finishes the step and saves; a second Ctrl-C aborts now.
        if self._stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._stop_requested = self._stop_requested or f"signal {signal.Signals(signum).name}"

    @contextmanager
    def _stop_on_signals(self):
        """Route the STOP_SIGNALS to `_request_stop` while training (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._request_stop) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def run(self) -> TrainResult:
        """Train to trainer.steps (or trainer.stop_at, or a signal), then release the process group."""
        # Released last, after the final save and the loggers; also when rank 0 fails while
        # setting up its outputs, so the other ranks' collectives fail instead of waiting.
        with self._closing, self._explained_collective_failures():
            try:
                return self._run()
            except BaseException as err:
                # A save still writing in the background finishes before the process group goes.
                try:
                    self.checkpoints.wait()
                except CheckpointError as save_error:
                    err.add_note(f"and a background checkpoint save failed too: {save_error}")
                if is_out_of_memory(err):
                    raise out_of_memory(err, self.memory_plan, self.device, self.step) from err
                raise

    def _run(self) -> TrainResult:
        job, tc = self.job, self.job.trainer
        run_dir = Path(tc.run_dir)
        if self.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(dump_yaml(job))
        stop_at = tc.stop_at or tc.steps
        result = TrainResult(step=self.step, tokens_seen=self.tokens_seen, skipped_steps=self.skipped_steps)
        # Rank 0 alone writes metrics and the console. start_step drops TensorBoard points a
        # resumed run is about to write again.
        start_step = self.step if self.resume_from else None
        metrics = MetricsLogger(
            job.metrics, run_dir, enabled=self.is_main, start_step=start_step, run_config=to_dict(job)
        )
        progress = Progress(job.metrics.console if self.is_main else "none", tc.steps, started=self._started)
        profiler = StepProfiler(
            job.metrics.profile_steps, self.step, run_dir, self.device, rank(), self.dims.world_size
        )
        with self._stop_on_signals(), metrics, contextlib.closing(progress), contextlib.closing(profiler):
            progress.message(f"layout: {self.dims.describe()}; {self.memory_plan.describe()}")
            progress.message(f"global batch: {describe_global_batch(tc, self.dims.dp)}")
            for line in self.data.summary(tc.steps, tc.global_batch_size):
                progress.message(line)
            for line in _launch_facts() + self.run_folder_notes + self.resume_messages:
                progress.message(line)
            if profiler.notice:
                progress.message(profiler.notice)
            if self.resume_from is not None:
                progress.message(f"resumed from {self.resume_from} at step {self.step}")
                for line in self.changed_settings:
                    progress.message(f"  changed since the checkpoint: {line}")
                for path in self.set_aside:
                    progress.message(f"  set aside a checkpoint newer than the resumed one: {path}")
            elif self.resume_requested:
                progress.message(f"no complete checkpoint in {self.checkpoints.folder}; starting from step 0")
            if self.step == 0:
                # Also a step-0 checkpoint (upcycled or imported) is measured before it trains.
                result.eval_losses[0] = self.evaluate()
                metrics.log(0, {"eval/loss": result.eval_losses[0]})
                progress.message(f"step 0: eval loss {result.eval_losses[0]:.4f}")
            switch = self.full_attention_from
            if switch is not None and self.step > switch:
                progress.message(f"MoBA layers run full attention since step {switch + 1} (attention.moba_full_after)")
            self._set_step_timeout()
            window_start, window_tokens = time.perf_counter(), 0
            while self.step < stop_at and not self._should_stop():
                if self.step == switch:
                    progress.message(
                        f"step {self.step + 1}: MoBA layers switch to full attention for the last "
                        f"{tc.steps - self.step} steps (attention.moba_full_after={job.attention.moba_full_after})"
                    )
                profiler.before_step(self.step + 1)
                loss, grad_norm = self.train_step()
                result.losses[self.step] = loss
                if self.probed:
                    metrics.log(self.step, self.runner.attention_entropy())
                while self.loader.notices:
                    progress.message(self.loader.notices.pop(0))
                window_tokens += self.tokens_per_step
                if self.nonfinite_in_a_row >= tc.max_nonfinite_steps:
                    raise TrainingDiverged(
                        f"step {self.step}: loss or gradient norm was NaN/inf for {self.nonfinite_in_a_row} "
                        f"steps in a row (trainer.max_nonfinite_steps={tc.max_nonfinite_steps}); "
                        "stopping without saving. Lower optimizer.lr or resume from the last checkpoint."
                    )
                last = self.step == stop_at
                tokens_per_s = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                if self.step % job.metrics.log_interval == 0 or last:
                    scalars = self._scalars(loss, grad_norm, tokens_per_s)
                    metrics.log(
                        self.step,
                        {**scalars, **self.loader.scalars()},
                        self.runner.merge_over_stages(moe_load_histograms(self.model)),
                    )
                    progress.update(self.step, scalars)
                    window_start, window_tokens = time.perf_counter(), 0
                else:
                    # Figures already on the host: the redraw adds no device sync and writes no metrics.
                    progress.update(
                        self.step, {"loss": loss, "lr": self.last_lr, "tokens_per_s": tokens_per_s}, logged=False
                    )
                paused = time.perf_counter()
                written = profiler.after_step(self.step)
                if written:
                    progress.message(written)
                if (tc.eval_interval and self.step % tc.eval_interval == 0) or self.step == tc.steps:
                    result.eval_losses[self.step] = self.evaluate()
                    metrics.log(self.step, {"eval/loss": result.eval_losses[self.step]})
                    progress.update(self.step, {"eval/loss": result.eval_losses[self.step]})
                interval = job.checkpoint.interval
                if interval and self.step % interval == 0:
                    result.checkpoint = self.save()
                # Evaluation and saving are not training throughput.
                pause = time.perf_counter() - paused
                window_start += pause
                progress.add_pause(pause)
            result.stopped_early = self.step < tc.steps
            if result.stopped_early:
                result.stopped_by = self._stop_reason(stop_at)
            saved_now = result.checkpoint is not None and result.checkpoint.name == step_folder_name(self.step)
            if job.checkpoint.save_final and not saved_now:
                result.checkpoint = self.save()
            # An asynchronous save commits (or raises) before the run reports it.
            self.checkpoints.wait()
            if result.stopped_early and result.checkpoint is not None:
                progress.message(
                    f"stopped at step {self.step} ({result.stopped_by}); resume with --resume auto ({result.checkpoint})"
                )
            self._phase("done")
            if self.is_main:
                _write_status(run_dir, self.step, tc.steps, result.stopped_by)
        result.step, result.tokens_seen, result.skipped_steps = self.step, self.tokens_seen, self.skipped_steps
        return result

    def _stop_reason(self, stop_at: int) -> str:
        """Why the loop ended early, as every rank agrees: a signal or the time limit on some rank
        (rank 0 names its own, or the one it was told of), else trainer.stop_at."""
        if self.step == stop_at and not self._stop_requested:
            return "trainer.stop_at"
        return self._stop_requested or "another rank's stop request"

    def _scalars(self, loss: float, grad_norm: float, tokens_per_s: float) -> dict[str, float]:
        scalars = {
            "loss": loss,
            "lr": self.last_lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "tokens_seen": float(self.tokens_seen),
            "skipped_steps": float(self.skipped_steps),
        }
        if self.peak_tflops:
            # tokens_per_s counts every rank's tokens; MFU is per accelerator.
            scalars["mfu"] = mfu(tokens_per_s / self.dims.world_size, self.flops_per_token, self.peak_tflops)
        scalars.update({f"memory/{k}": v for k, v in memory_stats(self.device).items()})
        scalars.update(self.runner.merge_over_stages(moe_metrics(self.model) | mtp_metrics(self.model)))
        return scalars


def _launch_facts() -> list[str]:
    """What a log reader needs to place this process: the scheduler's job and restart counts."""
    lines = []
    if "SLURM_JOB_ID" in os.environ:
        lines.append(
            f"SLURM job {os.environ['SLURM_JOB_ID']}, restart {os.environ.get('SLURM_RESTART_COUNT', '0')} "
            "(SLURM_RESTART_COUNT)"
        )
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restarts:
        lines.append(f"torchrun restart {restarts} of at most {os.environ.get('TORCHELASTIC_MAX_RESTARTS', '?')}")
    return lines


def _write_status(run_dir: Path, step: int, steps: int, stopped_by: str | None) -> None:
    """`<run_dir>/status.json`: whether the run finished, for a batch script deciding to requeue it."""
    status = {"step": step, "steps": steps, "finished": step >= steps, "stopped_by": stopped_by}
    tmp = run_dir / f".{STATUS_FILE}.tmp"
    tmp.write_text(json.dumps(status) + "\n")
    tmp.replace(run_dir / STATUS_FILE)
