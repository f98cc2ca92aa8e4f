"""Pipeline parallelism: cut the transformer into stages and run them with torch.distributed.pipelining.

Shape legend: B rows of a micro-batch, S sequence, D model dim, V vocabulary, M micro-batches per step.

What a rank holds. The trainer keeps one module per rank, `model`: the Transformer with the pieces
other ranks run removed (`tok_embeddings`, `norm`, `output` set to None, other blocks deleted from
`layers`, whose keys stay the global layer numbers). Its parameter names are the full model's, so
the optimizer, DCP checkpoints (loadable at any layout), gradient clipping and MoE metrics see
exactly this rank's part. Each stage the rank runs is a `StageModule`: a view that references the
model's blocks (and embedding, final norm and head where it is the first or last stage) and runs
them with `run_pieces`, as `Transformer.forward` runs the whole model. `PipelineStage` wraps the
view, and FSDP2 shards it as a root (`apply_fsdp(stage, mesh)`: one unit per block, the view itself the unit of the embedding or head),
so the schedule sees an FSDPModule and leaves gradient reduction to the step's last backward. The
views are not submodules of `model` (their names would repeat), so a rank that runs two virtual
stages still has one `model`. Per-stage Transformers in a container would name parameters
`stages.0.layers...`, and checkpoints would depend on the layout.

Order of use (the model on the meta device until `to_empty`, as DESIGN.md's principle 3 asks;
`parallel.parallelize` and the trainer do this):

    check_pipeline(cfg.parallel, cfg.trainer.grad_accum_steps, cfg.model)   # before any process group
    apply_tp / apply_ep / apply_compile / apply_ac on model
    split = pipeline_split(model, cfg.parallel, pp_rank, pp, seq_len)     # model loses other ranks' pieces
    for stage in split.stages: apply_fsdp(stage, mesh)                    # when data parallel
    model.to_empty(device=device)
    with torch.no_grad(), split.whole_model(model), SingleProcessInit(device):
        model.init_weights()                                              # one process's exact values
    set_aux_loss_scale(model, 1.0)                                        # see below
    schedule = PipelineSchedule(split, mesh.group("pp"), M, micro_batch_size, seq_len, device, precision)
    loss = schedule.train_step(tokens, targets, sequences)                # M * micro_batch_size rows

`parallel.step.StepRunner` does the last three steps for the trainer, and evaluates.

Sequences. Every stage needs the micro-batch's `SequenceInfo` (positions, documents), computed
once per micro-batch on the whole sequence before the step; the schedule splits only tensors by
rows, so the stage modules hold the step's list and `_Stage` tells them which micro-batch runs.

Precision. Stage boundaries (what PipelineStage allocates to receive) are typed by the precision
policy (`parallel.precision`), not by a parameter: under FSDP mixed precision the stored
parameters are fp32 shards while the stages send bf16, and torch does not check a receive
buffer's dtype against what arrives.

Micro-batches. A step's M micro-batches are the trainer's grad_accum_steps micro-batches of
micro_batch_size rows, stacked in order (micro-batch i = rows [i B, (i + 1) B)), so a pipeline step
sees exactly what one process sees with gradient accumulation. The loss of a micro-batch is its mean
cross-entropy; the schedule (scale_grads=True) divides every gradient by M at the end, which gives
the gradient of the mean over micro-batches. It divides the MoE auxiliary losses' gradients too, so
the caller sets their scale to 1.0 (`set_aux_loss_scale(model, 1.0)`), not 1 / M.

Multi-token prediction (model/mtp.py): its depths sit on the last stage with the head; while
training, the first stage's embedding of the depths' input tokens travels beside the hidden state,
so stage boundaries are [B, S, D (1 + mtp_depth)] in training and [B, S, D] in evaluation.

Stage metadata is static (shapes are known from the config), so the schedule never runs its
metadata-inference forward and backward on the first micro-batch: that would cost one more
micro-batch's compute and add a forward to the MoE load counts.

Schedules: "1f1b" (Schedule1F1B, one stage per rank), "interleaved_1f1b" (ScheduleInterleaved1F1B,
stage s on rank s mod pp) and "zero_bubble" (ScheduleZBVZeroBubble). ZBV was chosen over
ScheduleInterleavedZeroBubble and ScheduleDualPipeV, which compute the same numbers: it accepts any
number of micro-batches (the looped variant has interleaved_1f1b's rounds rule, DualPipeV needs
M >= 2 pp), and its V placement (rank r runs stages r and 2 pp - 1 - r) turns at rank pp - 1
without a send. Zero-bubble schedules split each backward into an input-gradient and a
weight-gradient pass; a compiled block's backward is one fused node that each pass would run
whole, so `check_pipeline` refuses compile with it (torch too refuses compiled stages there).
Activation checkpointing works with it.

FSDP. Stages keep their parameters gathered from a step's first forward to its last backward
(`PipelineSchedule` turns off FSDP's reshard after forward): re-gathering per micro-batch would
multiply the all-gathers by M, and a zero-bubble input-gradient pass run on resharded weights
would never compute their gradients.

Stage split. `split_layers` balances estimated cost per stage; `layer_costs` estimates each piece's
training FLOPs per token by the 6N + attention rule of train/flops.py: a block 6 x its active
parameters (top-k experts for MoE) + 12 H d x the keys a query attends (S / 2 causal, fewer in
MoBA layers: `AttentionConfig.attended_keys`); the head 6 x (D V + D), plus the multi-token
prediction depths that sit on the last stage with it (model/mtp.py); the embedding 0 (a lookup
multiplies nothing).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
)

from sparsetron.model.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig, check
from sparsetron.model.params import active_params
from sparsetron.model.sequence import SequenceInfo
from sparsetron.model.transformer import Transformer, run_pieces
from sparsetron.parallel.config import ParallelConfig
from sparsetron.parallel.precision import FP32, Precision, cross_entropy

# ---------------------------------------------------------------------------------------------
# Checks before any process group exists.


def check_pipeline(
    cfg: ParallelConfig, grad_accum_steps: int, model_cfg: ModelConfig, accum_key: str = "trainer.grad_accum_steps"
) -> None:
    """Refuse, naming the keys, a pipeline layout that cannot run (nothing to check at pipeline 1).
    `accum_key` names the micro-batch count (trainer.global_batch_size may have set it).

    Cheap and collective-free: call it with the other config checks.
    """
    pp = cfg.pipeline
    if pp == 1:
        return
    check(
        not model_cfg.tie_embeddings,
        "model.tie_embeddings",
        f"the embedding and the output head sit on different stages with parallel.pipeline={pp}; untie them",
    )
    per_rank = cfg.stages_per_rank()
    n_stages = pp * per_rank
    check(
        n_stages <= model_cfg.n_layers,
        "parallel.pipeline",
        f"pipeline {pp} x pipeline_stages_per_rank {per_rank} = {n_stages} stages, "
        f"but model.n_layers={model_cfg.n_layers}: every stage needs at least one layer",
    )
    M = grad_accum_steps
    schedule = cfg.pipeline_schedule
    if schedule == "1f1b":
        check(
            M >= pp,
            accum_key,
            f"the 1f1b schedule needs at least parallel.pipeline={pp} micro-batches per step, got {M}",
        )
    elif schedule == "interleaved_1f1b":
        # torch runs M micro-batches in max(1, M // pp) equal rounds.
        rounds = max(1, M // pp)
        check(
            M % rounds == 0,
            accum_key,
            f"interleaved_1f1b runs the micro-batches in rounds of parallel.pipeline={pp}; {M} does not split "
            f"into {rounds} equal rounds (use fewer than {2 * pp} or a multiple of {pp})",
        )
    else:
        check(
            not cfg.compile,
            "parallel.compile",
            "the zero_bubble pipeline schedule splits each backward into input- and weight-gradient passes, and "
            "a compiled block's fused backward would run whole in both; use parallel.pipeline_schedule=interleaved_1f1b",
        )


# ---------------------------------------------------------------------------------------------
# Which layers each stage runs, and where.


def layer_costs(
    model_cfg: ModelConfig, attn_cfg: AttentionConfig, moe_cfg: MoEConfig | None, seq_len: int
) -> tuple[float, list[float], float]:
    """(embedding, [each block], head): training FLOPs per token (see the module docstring)."""
    H, d = attn_cfg.n_heads, attn_cfg.head_size(model_cfg.dim)

    def active_through(n_blocks: int) -> int:
        # `active_params` is the one definition of what a token multiplies with; a model cut after
        # n blocks gives, by differences, each block's share (dense and MoE blocks differ).
        return active_params(replace(model_cfg, n_layers=n_blocks, mtp_depth=0), attn_cfg, moe_cfg)

    n = model_cfg.n_layers
    totals = [active_through(i) for i in range(n + 1)]
    keys = attn_cfg.attended_keys(n, seq_len, extra_layers=model_cfg.mtp_depth)
    blocks = [6.0 * (totals[i + 1] - totals[i]) + 12.0 * H * d * keys[i] for i in range(n)]
    # The final norm and output head (what a model of no blocks holds), and the multi-token
    # prediction depths, which sit on the last stage with the head.
    mtp = active_params(model_cfg, attn_cfg, moe_cfg) - totals[n]
    head = 6.0 * (totals[0] + mtp) + 12.0 * H * d * sum(keys[n:])
    return 0.0, blocks, head


def split_layers(
    n_layers: int,
    n_stages: int,
    block_costs: Sequence[float] | None = None,
    embed_cost: float = 0.0,
    head_cost: float = 0.0,
) -> list[range]:
    """Contiguous layer ranges, one per stage in order, each stage at least one layer.

    A stage costs its blocks' costs (1 each when `block_costs` is None), plus `embed_cost` for the
    first stage and `head_cost` for the last. The split minimises the most expensive stage (which
    sets the pipeline's pace); among such splits, the most even one (least sum of squared stage
    costs); remaining ties give later stages the extra layers (earlier stages hold more
    micro-batches' activations under 1F1B).
    """
    if n_stages < 1:
        raise ValueError(f"need at least one pipeline stage, got {n_stages}")
    if n_stages > n_layers:
        raise ValueError(
            f"cannot split {n_layers} layers into {n_stages} pipeline stages: every stage needs at least one layer"
        )
    costs = [1.0] * n_layers if block_costs is None else [float(c) for c in block_costs]
    if len(costs) != n_layers or min(costs + [embed_cost, head_cost]) < 0:
        raise ValueError(f"need {n_layers} non-negative block costs and non-negative embed/head costs, got {costs}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(stage: int, start: int, end: int) -> float:
        extra = (embed_cost if stage == 0 else 0.0) + (head_cost if stage == n_stages - 1 else 0.0)
        return prefix[end] - prefix[start] + extra

    def solve(combine, admissible) -> tuple[list[list[float]], list[list[int]]]:
        # best[k][i]: the best value over splits of layers [0, i) into k stages; stage k may end at i
        # only if every later stage can still take a layer.
        inf = float("inf")
        best = [[inf] * (n_layers + 1) for _ in range(n_stages + 1)]
        start = [[0] * (n_layers + 1) for _ in range(n_stages + 1)]
        best[0][0] = 0.0
        for k in range(n_stages):
            for i in range(k + 1, n_layers - (n_stages - 1 - k) + 1):
                for j in range(k, i):
                    c = cost(k, j, i)
                    if best[k][j] == inf or not admissible(c):
                        continue
                    value = combine(best[k][j], c)
                    # Strictly better only, so the earliest start (the later stage longer) wins ties.
                    if value < best[k + 1][i] - 1e-12 * max(1.0, abs(value)):
                        best[k + 1][i], start[k + 1][i] = value, j
        return best, start

    bottleneck = solve(max, lambda c: True)[0][n_stages][n_layers]
    _, start = solve(lambda acc, c: acc + c * c, lambda c: c <= bottleneck * (1 + 1e-9) + 1e-12)
    ranges: list[range] = []
    end = n_layers
    for k in range(n_stages, 0, -1):
        ranges.insert(0, range(start[k][end], end))
        end = start[k][end]
    return ranges


def stage_ranks(pp: int, stages_per_rank: int, schedule: str) -> list[int]:
    """The pipeline rank of each stage: looped (stage s on rank s mod pp), or V-shaped for
    zero_bubble (ranks 0..pp-1, then back pp-1..0), as torch's schedules place them."""
    ranks = []
    for s in range(pp * stages_per_rank):
        backward_leg = schedule == "zero_bubble" and (s // pp) % 2 == 1
        ranks.append(pp - 1 - s % pp if backward_leg else s % pp)
    return ranks


# ---------------------------------------------------------------------------------------------
# Stage modules.


class StageModule(nn.Module):
    """One pipeline stage: a view of a rank model's pieces, run with `run_pieces`.

    forward(x) takes token ids [B, S] on the first stage and hidden states [B, S, D] elsewhere,
    and returns hidden states, or logits [B, S, V] on the last stage. Which sequences the rows
    hold comes from `sequences`, one `SequenceInfo` per micro-batch of the step, set by the
    runner before the schedule runs (the schedule splits only tensors by rows, and cu_seqlens is
    not split by rows), and picked by `microbatch`, which `_Stage` sets before each forward.
    """

    def __init__(self, model: Transformer, layer_ids: range, first: bool, last: bool):
        super().__init__()
        self.model_cfg = model.model_cfg
        self.tok_embeddings = model.tok_embeddings if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layer_ids})
        self.norm = model.norm if last else None
        self.output = model.output if last else None
        self.mtp = model.mtp if last else None
        self.precision: Precision = FP32
        """The forward's precision (set by PipelineSchedule)."""
        self.sequences: list[SequenceInfo] = []
        self.microbatch = 0

    def forward(self, x: torch.Tensor, seq: SequenceInfo | None = None) -> torch.Tensor:
        seq = seq if seq is not None else self.sequences[self.microbatch]
        # Autocast here rather than around the schedule keeps the backward out of the autocast
        # region, as in the non-pipelined step.
        with self.precision.autocast(x.device.type):
            return run_pieces(x, seq, self.tok_embeddings, self.layers.values(), self.norm, self.output, self.mtp)


class _Stage(PipelineStage):
    """A PipelineStage that tells its module which micro-batch it is running (see StageModule)."""

    def forward_one_chunk(self, fwd_chunk_id: int, *args, **kwargs):
        self.submod.microbatch = fwd_chunk_id
        return super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)


@dataclass
class PipelineSplit:
    """A rank's part of the pipeline: what `pipeline_split` made of the model."""

    schedule: str
    """parallel.pipeline_schedule."""
    layer_ranges: list[range]
    """Layers of every stage, in stage order."""
    stage_ranks: list[int]
    """Pipeline rank of every stage."""
    stage_indices: list[int]
    """The stages this rank runs, ascending."""
    stages: list[StageModule]
    """This rank's stage modules, in the order of `stage_indices`."""
    unowned: dict[str, nn.Module]
    """Pieces of the model other ranks run, by attribute name ("layers.<i>" for blocks), on the
    meta device; kept only so that initialisation can draw their random numbers."""

    @property
    def num_stages(self) -> int:
        return len(self.layer_ranges)

    @contextlib.contextmanager
    def whole_model(self, model: Transformer) -> Iterator[Transformer]:
        """Put the pieces other ranks run back into `model` (on the meta device) for the block.

        `with split.whole_model(model), SingleProcessInit(): model.init_weights()` then draws the
        random stream exactly as one process does: SingleProcessInit draws and drops the meta
        pieces' values. Afterwards they are removed again, and the owned blocks get back the
        rotary tables they had (init_weights re-shares one table over all blocks, meta ones too).
        """
        rope = [(m, m.rope_cos, m.rope_sin) for m in model.modules() if hasattr(m, "rope_cos")]
        for name, piece in self.unowned.items():
            _set_piece(model, name, piece)
        try:
            yield model
        finally:
            for name in self.unowned:
                _set_piece(model, name, None)
            for module, cos, sin in rope:
                module.rope_cos, module.rope_sin = cos, sin


def _set_piece(model: Transformer, name: str, piece: nn.Module | None) -> None:
    if name.startswith("layers."):
        key = name.removeprefix("layers.")
        if piece is None:
            del model.layers[key]
        else:
            model.layers[key] = piece
    else:
        setattr(model, name, piece)


def pipeline_split(model: Transformer, cfg: ParallelConfig, pp_rank: int, pp: int, seq_len: int) -> PipelineSplit:
    """Cut `model` (still on the meta device) to what pipeline rank `pp_rank` of `pp` runs, in place,
    and build that rank's stage modules. No collective; `seq_len` weighs attention in the split."""
    schedule, per_rank = cfg.pipeline_schedule, cfg.stages_per_rank()
    if model.model_cfg.tie_embeddings:
        raise ConfigError(f"model.tie_embeddings: the embedding and head sit on different stages with pipeline={pp}")
    embed, blocks, head = layer_costs(model.model_cfg, model.attn_cfg, model.moe_cfg, seq_len)
    n_stages = pp * per_rank
    ranges = split_layers(model.model_cfg.n_layers, n_stages, blocks, embed, head)
    ranks = stage_ranks(pp, per_rank, schedule)
    mine = [s for s in range(n_stages) if ranks[s] == pp_rank]
    stages = [StageModule(model, ranges[s], first=s == 0, last=s == n_stages - 1) for s in mine]

    holds_first, holds_last = 0 in mine, n_stages - 1 in mine
    unowned = {
        name: getattr(model, name)
        for name, owned in (
            ("tok_embeddings", holds_first),
            ("norm", holds_last),
            ("output", holds_last),
            ("mtp", holds_last),
        )
        if not owned and getattr(model, name) is not None
    }
    owned_layers = {str(i) for s in mine for i in ranges[s]}
    unowned.update({f"layers.{key}": block for key, block in model.layers.items() if key not in owned_layers})
    for name in unowned:
        _set_piece(model, name, None)
    return PipelineSplit(schedule, ranges, ranks, mine, stages, unowned)


# ---------------------------------------------------------------------------------------------
# Running a step.


class PipelineSchedule:
    """A rank's stages run through the training schedule (`train_step`), built after the model
    is materialised and initialised. `parallel.step.StepRunner` drives it; evaluation passes
    the stages with plain send/recv there.

    Stage boundaries are typed by the precision policy: hidden states and logits travel in its
    activation dtype (bf16 under mixed precision), whatever dtype the parameters are stored in.
    """

    def __init__(
        self,
        split: PipelineSplit,
        pp_group: dist.ProcessGroup,
        n_microbatches: int,
        micro_batch_size: int,
        seq_len: int,
        device: torch.device,
        precision: Precision = FP32,
        tp: int = 1,
    ):
        self.split = split
        self.n_microbatches = n_microbatches
        self.micro_batch_size = micro_batch_size
        cfg = split.stages[0].model_cfg
        B, S, dtype = micro_batch_size, seq_len, precision.activation_dtype
        # Under tensor + sequence parallelism each rank passes on its S / tp positions; with
        # multi-token prediction the depths' input embeddings travel beside the hidden state.
        width = cfg.dim * (1 + cfg.mtp_depth)
        hidden = torch.empty(B, S // tp, width, dtype=dtype, device="meta", requires_grad=True)
        tokens = torch.empty(B, S, dtype=torch.int64, device="meta")
        logits = torch.empty(B, S, cfg.vocab_size, dtype=dtype, device="meta", requires_grad=True)
        stages = []
        for index, module in zip(split.stage_indices, split.stages, strict=True):
            module.precision = precision
            if isinstance(module, FSDPModule):
                # See "FSDP" in the module docstring; the schedule reshards after the last backward.
                module.set_reshard_after_forward(False)
            first, last = index == 0, index == split.num_stages - 1
            stages.append(
                _Stage(
                    module,
                    index,
                    split.num_stages,
                    device,
                    input_args=tokens if first else hidden,
                    output_args=logits if last else hidden,
                    group=pp_group,
                )
            )
        if split.schedule == "1f1b":
            self.schedule = Schedule1F1B(stages[0], n_microbatches, loss_fn=cross_entropy)
        else:
            schedule_class = ScheduleInterleaved1F1B if split.schedule == "interleaved_1f1b" else ScheduleZBVZeroBubble
            self.schedule = schedule_class(stages, n_microbatches, loss_fn=cross_entropy)

    def train_step(
        self, tokens_BS: torch.Tensor, targets_BS: torch.Tensor, sequences: list[SequenceInfo]
    ) -> torch.Tensor | None:
        """Forward and backward of a step's micro-batches (rows: n_microbatches x micro_batch_size,
        in order; `sequences[i]` describes micro-batch i); gradients accumulate into the
        parameters' .grad, averaged over micro-batches. Returns the sum of the micro-batches'
        losses (0-dim fp32, detached) on the rank holding the last stage, else None."""
        rows = self.n_microbatches * self.micro_batch_size
        if tokens_BS.shape[0] != rows or len(sequences) != self.n_microbatches:
            raise ValueError(
                f"a pipeline step takes {self.n_microbatches} micro-batches of {self.micro_batch_size} rows "
                f"= {rows} rows, got {tokens_BS.shape[0]} rows and {len(sequences)} sequence descriptions"
            )
        for module in self.split.stages:
            module.sequences = sequences
        holds_first = 0 in self.split.stage_indices
        holds_last = self.split.num_stages - 1 in self.split.stage_indices
        losses: list[torch.Tensor] = []
        args = (tokens_BS,) if holds_first else ()
        self.schedule.step(*args, target=targets_BS if holds_last else None, losses=losses, return_outputs=False)
        for module in self.split.stages:
            module.sequences = []
        return torch.stack(losses).sum().detach().float() if holds_last else None
