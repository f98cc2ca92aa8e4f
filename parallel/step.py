"""The step runner: one optimizer step's forward/backward, gradient finalisation and loss, and
evaluation, the same object for every layout (DESIGN.md, principle 6).

    runner = StepRunner(model, split, mesh, dims, precision, grad_accum_steps, micro_batch_size,
                        seq_len, device)
    loss, grad_norm = runner.train_step(micro_batches, grad_clip)  # then optimizer.step()
    runner.close_step(applied)                                     # MoE bias update and stats
    eval_loss = runner.eval_loss(batches)

A micro-batch is anything with `tokens`, `targets` and `doc_ids` [B, S] (train.data.Batch).
Each one's `SequenceInfo` is computed once, on the whole sequence, before any forward; under
context parallelism each cp rank then keeps its share of the tokens, targets and positions
(`parallel.context_parallel.shard_batch`).

What it hides from the trainer:
- how micro-batches run: a loop with gradient accumulation, or the pipeline schedule
  (`parallel.pipeline.PipelineSchedule`), which divides gradients by the micro-batches itself;
- gradient finalisation: the HSDP all-reduce across replicas on the last micro-batch only,
  the tensor-parallel sums of replicated parameters' shares, clipping by the norm over every
  mesh and pipeline stage;
- the loss: each micro-batch's mean cross-entropy in fp32 (`parallel.precision.cross_entropy`),
  averaged over micro-batches and data and context ranks (each holding as many tokens), the
  same number on every rank;
- precision: every forward under the one policy (`parallel.precision.Precision`);
- evaluation: one path for every layout, the rank's stages in order with send/recv between
  pipeline ranks (one stage, the whole model, without a pipeline);
- the process groups: the MoE counts summed over the ranks that saw other tokens, the metrics
  merged over pipeline stages, a stop agreed by every rank.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from sparsetron.model.attention_entropy import attention_entropy
from sparsetron.model.moe.balancing import set_aux_loss_scale, update_expert_bias
from sparsetron.model.mtp import MTPTargets
from sparsetron.model.sequence import SequenceInfo
from sparsetron.model.transformer import Transformer
from sparsetron.parallel.clipping import clip_grad_norm
from sparsetron.parallel.collectives import sum_over
from sparsetron.parallel.context_parallel import shard_batch
from sparsetron.parallel.dims import ParallelDims, ParallelMesh
from sparsetron.parallel.fsdp import reduce_across_replicas
from sparsetron.parallel.pipeline import PipelineSchedule, PipelineSplit
from sparsetron.parallel.precision import Precision, cross_entropy
from sparsetron.parallel.sigma_reparam import power_iteration_step
from sparsetron.parallel.tensor_parallel import sum_grads_over_tp


class MicroBatch(Protocol):
    tokens: torch.Tensor
    targets: torch.Tensor
    doc_ids: torch.Tensor


class StepRunner:
    """Runs training steps and evaluation of `model` (this rank's part of it) at any layout.

    `split` is this rank's pipeline split when pipelined (`parallel.parallelize` returns it),
    else None; `mesh` is None in a single process. Build it after the model is materialised.
    """

    def __init__(
        self,
        model: Transformer,
        split: PipelineSplit | None,
        mesh: ParallelMesh | None,
        dims: ParallelDims,
        precision: Precision,
        grad_accum_steps: int,
        micro_batch_size: int,
        seq_len: int,
        device: torch.device,
    ):
        self.model = model
        self.mesh = mesh
        self.dims = dims
        self.precision = precision
        self.grad_accum_steps = grad_accum_steps
        self.device = device
        self.pipeline = None
        self.cp_rank = mesh["cp"].get_local_rank() if dims.cp_enabled else None
        if split is not None:
            local_len = seq_len // dims.cp
            self.pipeline = PipelineSchedule(
                split, mesh.group("pp"), grad_accum_steps, micro_batch_size, local_len, device, precision, dims.tp
            )
            self.stages: dict[int, nn.Module] = dict(zip(split.stage_indices, split.stages, strict=True))
            self.stage_ranks = split.stage_ranks
        else:
            self.stages = {0: model}
            self.stage_ranks = [0]
        self.pp_group = mesh.group("pp") if self.pipeline is not None else None
        self.dp_group = mesh.group("dp_cp") if mesh is not None and dims.dp_cp > 1 else None
        # Ranks that saw different tokens of each layer: MoE expert counts are summed over them.
        self.token_group = mesh.group("dp_cp_tp") if mesh is not None else None
        # The pipeline schedule divides every gradient by the micro-batches itself.
        side_loss_scale = 1.0 if self.pipeline is not None else 1.0 / grad_accum_steps
        set_aux_loss_scale(model, side_loss_scale)
        if model.mtp is not None:
            model.mtp.loss_scale = side_loss_scale

    # ---- training -------------------------------------------------------------------------

    def train_step(self, micro_batches: list[MicroBatch], grad_clip: float) -> tuple[float, float]:
        """Forward and backward of the step's micro-batches, gradients finalised and clipped to
        `grad_clip` (when positive): (mean loss over every rank's tokens, gradient norm before
        clipping). The optimizer step is the caller's."""
        if len(micro_batches) != self.grad_accum_steps:
            raise ValueError(f"a step takes {self.grad_accum_steps} micro-batches, got {len(micro_batches)}")
        self.model.train()
        if self.model.model_cfg.sigma_reparam:
            # Once per step, before any forward: every micro-batch, stage and recomputation sees one sigma.
            power_iteration_step(self.model)
        batches = [self._prepare(b.to(self.device, non_blocking=True), training=True) for b in micro_batches]
        if self.pipeline is not None:
            tokens = torch.cat([tokens for tokens, _, _ in batches])
            targets = torch.cat([targets for _, targets, _ in batches])
            sequences = [seq for _, _, seq in batches]
            total = self._from_last_stage(self.pipeline.train_step(tokens, targets, sequences))
        else:
            total = torch.zeros((), device=self.device)
            for i, (tokens, targets, seq) in enumerate(batches):
                if self.dims.dp_replicate_enabled:
                    reduce_across_replicas(self.model, i == len(batches) - 1)
                loss = self._loss(self.model, tokens, targets, seq)
                (loss / len(batches)).backward()
                total += loss.detach()
        if self.dp_group is not None:
            # Every rank holds the same number of tokens, so the mean of the ranks' means is the global mean.
            dist.all_reduce(total, group=self.dp_group)
            total /= dist.get_world_size(self.dp_group)
        if self.dims.tp_enabled:
            sum_grads_over_tp(self.model, self.mesh["tp"])
        grad_norm = clip_grad_norm(self.model, grad_clip, self.pp_group)
        return (total / len(batches)).item(), grad_norm.item()

    def _prepare(self, batch: MicroBatch, training: bool = False) -> tuple[torch.Tensor, torch.Tensor, SequenceInfo]:
        """The tokens, targets and SequenceInfo this rank runs of a micro-batch on its device; a
        training micro-batch of a model with multi-token prediction carries its targets (`seq.mtp`)."""
        seq = self.model.sequence_info(batch.tokens, batch.doc_ids)
        depth = self.model.model_cfg.mtp_depth
        if training and depth:
            seq.mtp = MTPTargets.build(batch.tokens, batch.targets, batch.doc_ids, depth)
        if self.cp_rank is None:
            return batch.tokens, batch.targets, seq
        return shard_batch(batch.tokens, batch.targets, seq, self.cp_rank, self.dims.cp)

    def close_step(self, applied: bool) -> None:
        """After the optimizer step (or its skip, `applied` False): the MoE layers' step statistics
        summed over the ranks that saw other tokens, and their expert bias moved when applied; the
        multi-token prediction losses averaged like the loss (on the ranks holding them)."""
        reducer = sum_over(self.token_group) if self.token_group is not None else None
        update_expert_bias(self.model, reducer, apply=applied)
        mtp = self.model.mtp
        if mtp is not None:
            losses = mtp.step_means(self.device)
            if self.dp_group is not None:
                # Like the next-token loss: the mean of the data and context ranks' means.
                dist.all_reduce(losses, group=self.dp_group)
                losses /= dist.get_world_size(self.dp_group)
            mtp.close_step(losses)

    def _loss(self, stage: nn.Module, x: torch.Tensor, targets_BS: torch.Tensor, seq: SequenceInfo) -> torch.Tensor:
        """Mean cross-entropy of the last stage (the whole model without a pipeline) on input x."""
        with self.precision.autocast(self.device.type):
            logits = stage(x, seq)
        return cross_entropy(logits, targets_BS)

    # ---- evaluation -----------------------------------------------------------------------

    @torch.no_grad()
    def eval_loss(self, batches: list[MicroBatch]) -> float:
        """Mean cross-entropy over `batches` (forward only; any number of rows each, of a length
        context parallelism can split), on every rank."""
        self.model.eval()
        try:
            losses = [self._eval_batch(batch.to(self.device)) for batch in batches]
        finally:
            self.model.train()
        return torch.stack(losses).mean().item()

    def _eval_batch(self, batch: MicroBatch) -> torch.Tensor:
        """One batch through this rank's stages in order, with plain send/recv between pipeline
        ranks (the training schedule's micro-batch count and shapes are fixed)."""
        tokens, targets, seq = self._prepare(batch)
        ranks, last = self.stage_ranks, len(self.stage_ranks) - 1
        loss = None
        for s, stage in sorted(self.stages.items()):
            if s == 0:
                x = tokens
            elif ranks[s - 1] != ranks[s]:
                B, S = tokens.shape
                shape = (B, S // self.dims.tp, self.model.model_cfg.dim)
                x = torch.empty(shape, dtype=self.precision.activation_dtype, device=self.device)
                dist.recv(x, group=self.pp_group, group_src=ranks[s - 1])
            if s == last:
                loss = self._loss(stage, x, targets, seq)
            else:
                x = stage(x, seq)  # a pipeline stage: it runs under the policy's autocast itself
                if ranks[s + 1] != ranks[s]:
                    dist.send(x.contiguous(), group=self.pp_group, group_dst=ranks[s + 1])
            if self.pipeline is not None:
                for module in stage.modules():
                    if isinstance(module, FSDPModule):
                        module.reshard()  # training keeps stages gathered; evaluation need not
        if self.pipeline is not None:
            loss = self._from_last_stage(loss)
        if self.cp_rank is not None:
            # The context ranks hold equal parts of the batch: the mean of their means.
            loss = loss.float()
            dist.all_reduce(loss, group=self.mesh.group("cp"))
            loss /= self.dims.cp
        return loss

    # ---- agreement between ranks ------------------------------------------------------------

    def _from_last_stage(self, loss: torch.Tensor | None) -> torch.Tensor:
        """The loss the rank holding the last stage computed, on every rank of the pipeline."""
        if loss is None:
            loss = torch.zeros((), dtype=torch.float32, device=self.device)
        loss = loss.float()
        dist.broadcast(loss, group=self.pp_group, group_src=self.stage_ranks[-1])
        return loss

    def merge_over_stages(self, values: dict) -> dict:
        """Per-layer values (MoE metrics) merged over the pipeline stages, each holding other layers."""
        if self.pipeline is None:
            return values
        gathered: list[dict] = [{} for _ in range(self.dims.pp)]
        dist.all_gather_object(gathered, values, group=self.pp_group)
        return {key: value for part in gathered for key, value in part.items()}

    def attention_entropy(self) -> dict[str, float]:
        """Per layer, the mean sampled attention entropy of a probed step (model.attention_entropy)
        over every rank's rows and heads, merged over the pipeline stages."""
        reducer = sum_over(self.token_group) if self.token_group is not None else None
        return self.merge_over_stages(attention_entropy(self.model, reducer))

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` is set on any rank (every rank must leave the loop at the same step)."""
        if self.mesh is None:
            return flag
        tensor = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())
