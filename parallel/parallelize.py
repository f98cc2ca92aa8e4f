"""Apply the parallel layout to a plain model, in one fixed order.

    tensor + sequence parallel -> expert parallel -> context parallel -> MoE reducers -> compile
    -> activation checkpointing -> pipeline split -> FSDP2 / HSDP

Tensor and expert parallelism turn weights into DTensors on their meshes and must see the
plain modules, before compile and activation checkpointing wrap them; context parallelism
wraps the attention ops of the plain modules (parallel/context_parallel.py). Each block is compiled
before it is wrapped in its checkpoint, so the checkpoint runs (and reruns) the compiled block
eagerly: with the checkpoint inside the compiled region, torch 2.13's partitioner saves a
tensor-parallel block's DeviceMesh among the tensors for backward and fails
("expected all tensors_saved_with_vc_check to be Tensors"). The pipeline split
(`parallel.pipeline`) then cuts the model to what this rank holds and builds its stage
modules, views of the wrapped blocks. FSDP comes last so that each compiled, checkpointed
block is one FSDP unit, with the expert weights a nested unit on their own
(expert-data-parallel) ranks; under pipelining each stage module is an FSDP root. The model
is still on the meta device here; the caller materialises it afterwards (`to_empty`, then
`init_weights` under `parallel.init.SingleProcessInit`, inside `split.whole_model` when
pipelined).

`check_supported` refuses what cannot run (uneven sequence splits, head counts Ulysses cannot
split, pipeline schedules that do not fit) by name, before any process group exists.
"""

from __future__ import annotations

from sparsetron.model.config import AttentionConfig, ModelConfig
from sparsetron.model.moe.balancing import TokenSplit, moe_layers
from sparsetron.model.transformer import Transformer
from sparsetron.parallel.activation_checkpoint import apply_ac
from sparsetron.parallel.collectives import sum_over
from sparsetron.parallel.compile import apply_compile
from sparsetron.parallel.config import ParallelConfig
from sparsetron.parallel.context_parallel import apply_cp, check_cp
from sparsetron.parallel.dims import ParallelDims, ParallelMesh
from sparsetron.parallel.expert_parallel import apply_ep
from sparsetron.parallel.fsdp import apply_fsdp
from sparsetron.parallel.pipeline import PipelineSplit, check_pipeline, pipeline_split
from sparsetron.parallel.precision import FP32, Precision
from sparsetron.parallel.tensor_parallel import apply_tp, check_tp


def check_supported(
    cfg: ParallelConfig,
    dims: ParallelDims,
    model_cfg: ModelConfig,
    attn_cfg: AttentionConfig,
    seq_len: int,
    accum: int,
    accum_key: str = "trainer.grad_accum_steps",
) -> None:
    """Refuse, before any process group exists, what this version cannot apply (errors name the key;
    `accum_key` names the micro-batches per step, `accum`)."""
    check_tp(dims.tp, seq_len)
    check_cp(dims.cp, dims.tp, cfg.context_style, seq_len, attn_cfg, model_cfg.n_layers)
    check_pipeline(cfg, accum, model_cfg, accum_key)


def parallelize(
    model: Transformer,
    cfg: ParallelConfig,
    dims: ParallelDims,
    mesh: ParallelMesh | None,
    seq_len: int,
    precision: Precision = FP32,
) -> PipelineSplit | None:
    """Apply tensor, expert, pipeline and data parallelism, activation checkpointing and compile
    as `cfg` and `dims` ask, in the module docstring's order, to `model` in place.

    Returns this rank's pipeline split (its stage modules) when pipelined, else None. `seq_len`
    weighs attention in the stage split; `precision` is the policy FSDP gathers parameters by
    (see parallel/precision.py).
    """
    if mesh is not None:
        if dims.tp_enabled:
            apply_tp(model, mesh["tp"])
        if dims.ep_enabled:
            apply_ep(model, mesh)
        if dims.cp_enabled:
            apply_cp(model, mesh.group("cp"), cfg.context_style)
        if dims.cp_enabled:
            # Every sequence is split over the cp x tp ranks (apply_tp's split covers tp alone):
            # balancing statistics are rebuilt over them.
            token_split = TokenSplit(sum_over(mesh.group("cp_tp")), dims.cp * dims.tp, averaged=dims.cp)
            for layer in moe_layers(model):
                layer.token_split = token_split
        if dims.dp_cp * dims.tp > 1:
            # The global auxiliary loss counts expert assignments over every rank holding other tokens.
            reducer = sum_over(mesh.group("dp_cp_tp"))
            for layer in moe_layers(model):
                layer.count_reducer = reducer
    if cfg.compile:
        apply_compile(model)
    if cfg.activation_checkpointing == "full":
        apply_ac(model)
    split = None
    if mesh is not None and dims.pp_enabled:
        split = pipeline_split(model, cfg, mesh["pp"].get_local_rank(), dims.pp, seq_len)
    if mesh is not None and dims.dp_cp > 1:
        for unit in split.stages if split is not None else [model]:
            apply_fsdp(unit, mesh, precision)
    return split
