"""A job's per-rank memory plan: the one a run prints at start, and the same plan for a layout
of any size computed in this one process, without its devices.

`job_memory_plan` is what the trainer prints. `plan_layout(job, world_size)` builds the model
on the meta device, parallelizes it over a fake process group of `world_size` ranks (torch's
FakeProcessGroup: a process group of one process whose collectives do nothing) and returns
rank 0's plan, as `sparsetron train` would print it on `world_size` ranks of `device_type`.
With pipeline stages the plan is the first stage's. Nothing is allocated: the recipes quote
it for layouts of several nodes, and tests/unit/test_recipes.py checks the figures they quote:

    python -m sparsetron.train.layout_plan moe-16b --nproc 32 [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn

from sparsetron.kernels.varlen import flash_varlen_available
from sparsetron.model.config import ConfigError
from sparsetron.model.transformer import Transformer
from sparsetron.parallel.dims import ParallelDims
from sparsetron.parallel.memory import AttentionPaths, MemoryPlan, memory_plan
from sparsetron.parallel.parallelize import check_supported, parallelize
from sparsetron.parallel.precision import Precision
from sparsetron.train.config import JobConfig


def job_memory_plan(
    model: nn.Module, job: JobConfig, dims: ParallelDims, precision: Precision, device_type: str
) -> MemoryPlan:
    """The plan for this rank's parallelized `model` of `job` on `dims`, computed in `precision`
    on a `device_type` device (which attention implementations run there)."""
    tc = job.trainer
    return memory_plan(
        model,
        job.model,
        job.attention,
        job.moe,
        dims,
        tc.micro_batch_size,
        job.data.seq_len,
        precision.activation_dtype.itemsize,
        job.parallel.activation_checkpointing == "full",
        # The first stage of a pipeline keeps up to one micro-batch per stage in flight.
        min(tc.grad_accum_steps, dims.pp),
        paths=AttentionPaths(
            flash=flash_varlen_available(device_type, precision.activation_dtype),
            moba_kernels=device_type == "cuda",  # kernels.moba.moba_attention's own switch
            cp_style=job.parallel.context_style,
        ),
    )


@contextmanager
def _fake_process_group(world_size: int):
    # Importing it registers the "fake" backend.
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("plan_layout runs outside a process group: this process already has one")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def plan_layout(job: JobConfig, world_size: int, device_type: str = "cuda") -> tuple[ParallelDims, MemoryPlan]:
    """The layout `job.parallel` resolves to on `world_size` ranks and rank 0's memory plan there,
    on `device_type` devices. `job.model.vocab_size` must be resolved (not 0)."""
    if job.model.vocab_size == 0:
        raise ConfigError("model.vocab_size: 0 (the tokenizer's) must be resolved before planning")
    dims = ParallelDims.from_config(job.parallel, world_size)
    dims.validate(job.attention.n_heads, job.attention.kv_heads(), job.moe.routed_experts)
    check_supported(job.parallel, dims, job.model, job.attention, job.data.seq_len, job.trainer.grad_accum_steps)
    precision = Precision.from_config(job.trainer.precision, torch.device(device_type))
    with torch.device("meta"):
        model = Transformer(job.model, job.attention, job.moe)
    # Compiling changes no tensor the plan counts, and would only cost time here.
    parallel = replace(job.parallel, compile=False)
    with _fake_process_group(world_size):
        parallelize(model, parallel, dims, dims.build_mesh("cpu"), job.data.seq_len, precision)
        return dims, job_memory_plan(model, job, dims, precision, device_type)


def main(argv: list[str] | None = None) -> int:
    """Print the layout and rank 0's memory plan of a recipe on --nproc GPUs; 2 on bad input."""
    from sparsetron.train.config_io import load_job_config
    from sparsetron.train.data import build_tokenizer
    from sparsetron.train.trainer import resolve_vocab

    parser = argparse.ArgumentParser(prog="python -m sparsetron.train.layout_plan", description=main.__doc__)
    parser.add_argument("config", metavar="CONFIG_OR_NAME", help="a YAML file or a shipped recipe")
    parser.add_argument("--nproc", type=int, default=1, metavar="N", help="ranks (GPUs) in all (default 1)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        job = load_job_config(args.config, args.overrides)
        resolve_vocab(job, build_tokenizer(job.data.tokenizer).vocab_size)
        dims, plan = plan_layout(job, args.nproc)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"layout on {args.nproc} GPUs: {dims.describe()}")
    print(plan.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
