"""`sparsetron plan`: what a run of a config would be, without running it.

    sparsetron plan tiny --nproc 4 --set parallel.tensor=2 --set parallel.data_parallel_shard=2

The layout is resolved and checked as `train` does it (the same errors), the model is built
on the meta device and parallelized as rank 0 of the job would parallelize it, and its
memory plan (parallel/memory.py) is the one `train` prints at start. A layout of several
ranks is planned in this one process under torch's "fake" process-group backend: the meshes
and DTensor shards exist, no collective communicates, no other process starts. The data is
built as `train` builds it (text, jsonl, parquet and hf sources are tokenized into the data
cache once, which takes as long as it does for `train`), so a missing file fails here too.
No tensor is allocated and no step runs.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sparsetron.model.config import ConfigError
from sparsetron.model.params import active_params, num_params
from sparsetron.model.transformer import Transformer
from sparsetron.parallel.dims import ParallelDims
from sparsetron.parallel.memory import MemoryPlan
from sparsetron.parallel.parallelize import parallelize
from sparsetron.parallel.precision import Precision
from sparsetron.train.config import JobConfig
from sparsetron.train.data import TrainingData, build_tokenizer, build_training_data
from sparsetron.train.flops import model_flops_per_token
from sparsetron.train.layout import rank_memory_plan, resolve_layout
from sparsetron.train.trainer import resolve_device, resolve_vocab

__all__ = ["Plan", "plan_job", "stage_memory_plans"]


@dataclass
class Plan:
    """What a run of a job would be; `lines()` is what `sparsetron plan` prints."""

    job: JobConfig
    dims: ParallelDims
    device: torch.device
    precision: Precision
    total_params: int
    embedding_params: int
    """The input embedding table's parameters (0 when tied to the head, which computes with it)."""
    active_params: int
    """Parameters one token's forward multiplies with, the input embedding left out (model/params.py)."""
    flops_per_token: float
    flops_per_token_full: float | None
    """With attention.moba_full_after: FLOPs per token once the MoBA layers run full attention."""
    memory: dict[int, MemoryPlan]
    """The memory plan of rank 0 (what `train` prints), and of the first rank of every other pipeline stage."""
    data: TrainingData

    @property
    def sequences_per_step(self) -> int:
        tc = self.job.trainer
        return tc.micro_batch_size * tc.grad_accum_steps * self.dims.dp

    @property
    def tokens_per_step(self) -> int:
        return self.sequences_per_step * self.job.data.seq_len

    def lines(self) -> list[str]:
        job, tc, dims = self.job, self.job.trainer, self.dims
        steps = tc.steps
        flops = f"{self.flops_per_token:.3g} (6 x active parameters + attention)"
        if self.flops_per_token_full is not None:
            switch = job.attention.moba_switch_step(steps)
            flops += f"; {self.flops_per_token_full:.3g} from step {switch + 1} (MoBA layers on full attention)"
        lines = [
            f"layout       {dims.describe()} ({dims.world_size} process{'es' if dims.world_size > 1 else ''})",
            f"device       {self.device.type}, precision {_precision_name(self.precision)}",
            f"parameters   {_count(self.total_params)} total ({_count(self.total_params - self.embedding_params)} "
            f"without the input embedding), {_count(self.active_params)} active per token",
            f"batch        {self.sequences_per_step:,} sequences of {job.data.seq_len} = {self.tokens_per_step:,} "
            f"tokens per step (micro-batch {tc.micro_batch_size} x accumulation {tc.grad_accum_steps} x "
            f"data-parallel {dims.dp})",
            f"steps        {steps:,} = {_count(steps * self.tokens_per_step)} tokens",
            *(
                f"data         {line.removeprefix('data: ')}"
                for line in self.data.summary(steps, self.sequences_per_step)
            ),
            f"FLOPs/token  {flops}",
        ]
        for rank, memory in self.memory.items():
            where = (
                f"rank {rank}"
                if dims.pp == 1
                else f"rank {rank} (pipeline stage {rank // (dims.world_size // dims.pp)})"
            )
            lines.append(f"memory       {where}: {memory.describe().removeprefix('memory per rank: ')}")
        return lines


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _precision_name(precision: Precision) -> str:
    return "bf16 (mixed)" if precision.mixed else "fp32"


def plan_job(job: JobConfig, world_size: int) -> Plan:
    """Resolve `job` for `world_size` processes as `train` would, without a real process group,
    an allocated tensor or a step. Bad input raises ConfigError or DataError."""
    dims = resolve_layout(job, world_size)
    # The device asked for: a GPU run can be planned where there is none (nothing runs on it).
    device = torch.device("cuda") if job.trainer.device == "cuda" else resolve_device(job.trainer.device)
    precision = Precision.from_config(job.trainer.precision, device)
    tokenizer = build_tokenizer(job.data.tokenizer)
    resolve_vocab(job, tokenizer.vocab_size)

    with torch.device("meta"):
        whole = Transformer(job.model, job.attention, job.moe)
    embedding = whole.tok_embeddings.weight
    tied = whole.output is not None and whole.output.weight is embedding
    memory = stage_memory_plans(job, dims, precision, device)

    tc = job.trainer
    data = build_training_data(
        job.data, tokenizer, tc.micro_batch_size, tc.eval_batches, 0, dims.dp, tc.grad_accum_steps
    )
    switch = job.attention.moba_switch_step(tc.steps)
    return Plan(
        job=job,
        dims=dims,
        device=device,
        precision=precision,
        total_params=num_params(whole),
        embedding_params=0 if tied else embedding.numel(),
        active_params=active_params(job.model, job.attention, job.moe),
        flops_per_token=model_flops_per_token(job.model, job.attention, job.moe, job.data.seq_len),
        flops_per_token_full=(
            None
            if switch is None
            else model_flops_per_token(job.model, job.attention, job.moe, job.data.seq_len, moba=False)
        ),
        memory=memory,
        data=data,
    )


def stage_memory_plans(
    job: JobConfig, dims: ParallelDims, precision: Precision, device: torch.device
) -> dict[int, MemoryPlan]:
    """The memory plan of the first rank of each pipeline stage (rank 0's is what `train` prints),
    each from the model built on the meta device and parallelized as that rank would. Needs
    model.vocab_size resolved (`resolve_vocab`)."""
    plans = {}
    for rank in range(0, dims.world_size, dims.world_size // dims.pp):
        with _posing_as(rank, dims.world_size):
            mesh = dims.build_mesh("cpu") if dims.world_size > 1 else None
            with torch.device("meta"):
                model = Transformer(job.model, job.attention, job.moe)
            parallelize(model, job.parallel, dims, mesh, job.data.seq_len, precision)
            plans[rank] = rank_memory_plan(model, job, dims, precision, device)
    return plans


@contextmanager
def _posing_as(rank: int, world_size: int):
    """This process as `rank` of `world_size` in a process group of torch's "fake" backend, whose
    collectives return at once without communicating (nothing with one rank)."""
    if world_size == 1:
        yield
        return
    if dist.is_initialized():
        raise ConfigError("plan runs in a process of its own: start it with python or sparsetron, not torchrun")
    if "fake" not in dist.Backend.backend_list:
        # torch before 2.11 registers the backend in its testing package.
        import torch.testing._internal.distributed.fake_pg  # noqa: F401
    dist.init_process_group("fake", store=dist.HashStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
