"""`sparsetron prune`: keep the most used routed experts of a trained MoE checkpoint (and/or merge
the others into them, or route each token to fewer experts) and write the result as a checkpoint.

    sparsetron prune --from runs/tiny --keep 8 --out runs/tiny-e8              # 16 -> 8 experts per layer
    sparsetron prune --from runs/tiny --keep 8 --merge --out runs/tiny-e8m     # merge the other 8 in
    sparsetron prune --from runs/tiny --keep 16 --top-k 2 --out runs/tiny-k2   # 4 -> 2 experts per token
    sparsetron eval runs/tiny-e8
    sparsetron train runs/tiny-e8/step_00000000/config.yaml --resume runs/tiny-e8   # fine-tune it

The checkpoint (a step folder, checkpoint folder or run folder, as for `sparsetron eval`) is read
in this process on trainer.device (`--set trainer.device=cpu`). Each routed expert's usage is
measured on calibration data: the checkpoint config's validation batches (the first --batches N,
default trainer.eval_batches, of its held-out split), or --data files in data.source's format.
`--set data.*` values describe the calibration data only; the written config keeps the source's
data section. Other --set values are written.
model/prune.py says what is kept (the criterion: summed routing weight), how the router and
experts are rewritten, when the result computes what the original did, and how --merge merges.

The output is an ordinary checkpoint folder `<out>/step_00000000` (save_step0): the pruned
weights, a never-stepped optimizer, a step-0 train state and the resolved job config, whose moe
section is written at granularity 1 (num_experts E', top_k k', expert_hidden explicit) because E'
need not be a multiple of the original granularity; trainer.run_dir becomes `<out>/run` unless
--set names one, so training from it never writes into the source run. `<out>/prune.json`
records the usage of every expert per layer, the kept ids, the merges and the source's loss on
the calibration batches. Everything that cannot be pruned consistently is refused by name before
a weight is read; nothing in --out is overwritten (it must not exist or be empty).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sparsetron.model.config import ConfigError
from sparsetron.model.hf import require_empty_folder
from sparsetron.model.prune import ExpertUsage, PrunePlan, plan_pruning, prune_model, pruned_moe_config
from sparsetron.train.checkpoint import CheckpointManager
from sparsetron.train.evaluate import checkpoint_job, eval_loss, load_model, open_checkpoint, validation_batches
from sparsetron.train.step0 import save_step0

__all__ = ["CRITERION", "REPORT_FILE", "PruneResult", "prune_checkpoint"]

REPORT_FILE = "prune.json"
CRITERION = "summed routing weight"


@dataclass
class PruneResult:
    checkpoint: Path
    """The step folder written."""
    plan: PrunePlan
    source_loss: float
    """The source model's loss on the calibration batches."""
    report: dict

    def describe(self) -> str:
        lines = [f"source loss on the calibration data {self.source_loss:.4f}"]
        for layer_id, kept in sorted(self.plan.kept.items()):
            line = f"layer {layer_id}: kept experts {kept}"
            merged = self.plan.merged_into.get(layer_id)
            if merged:
                line += "; merged " + ", ".join(f"{p}->{q}" for p, q in sorted(merged.items()))
            lines.append(line)
        return "\n".join(lines)


def prune_checkpoint(
    source: str | Path,
    out: str | Path,
    keep: int,
    top_k: int | None = None,
    *,
    merge: bool = False,
    data_paths: list[str] | None = None,
    overrides: list[str] | None = None,
    batches: int | None = None,
) -> PruneResult:
    """Prune the checkpoint `source` names to `keep` routed experts per MoE layer (`top_k` per
    token, default unchanged) and write `out`/step_00000000; see the module docstring."""
    out = Path(out).expanduser()
    require_empty_folder(out, "prune: --out")
    overrides = list(overrides or [])
    manager, folder, measure_job = open_checkpoint(source, data_paths, overrides, batches)
    # What is written: the source's data section, without the calibration files and data.* values.
    written_overrides = [item for item in overrides if not item.strip().startswith("data.")]
    job = checkpoint_job(manager.read_config(folder), folder, None, written_overrides, None)
    job.moe = pruned_moe_config(job.moe, job.model, keep, top_k)
    if not any(item.partition("=")[0].strip() == "trainer.run_dir" for item in overrides):
        job.trainer.run_dir = str(out / "run")
    try:
        job.validate()
    except ConfigError as err:
        raise ConfigError(
            f"prune: the pruned config (moe.num_experts={keep}, granularity 1) is invalid: {err}"
        ) from err
    if measure_job.trainer.eval_batches < 1:
        raise ConfigError(f"checkpoint {folder}: trainer.eval_batches is 0 in its config; give --batches N")
    batch_list, data = validation_batches(measure_job)

    model, step = load_model(manager, folder, measure_job)
    with ExpertUsage(model) as usage:
        source_loss = eval_loss(model, measure_job, batch_list)
    plan = plan_pruning(usage, keep, job.moe.n_groups, merge)
    pruned = prune_model(model, job.moe, plan)
    del model

    report = {
        "source": str(folder),
        "source_step": step,
        "keep": keep,
        "top_k": job.moe.top_k,
        "merge": merge,
        "criterion": CRITERION,
        "similarity": "cosine of router logits" if merge else None,
        "calibration": {"data": data, "batches": len(batch_list), "source_loss": source_loss},
        "overrides": overrides,
        "layers": {
            str(layer_id): {
                "tokens": plan.usage[layer_id].tokens_E.tolist(),
                "weight": plan.usage[layer_id].weight_E.tolist(),
                "kept": kept,
                "merged_into": {str(p): q for p, q in sorted(plan.merged_into.get(layer_id, {}).items())},
            }
            for layer_id, kept in sorted(plan.kept.items())
        },
    }
    written = save_step0(
        CheckpointManager(out),
        pruned,
        job,
        after_save=lambda: (out / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n"),
    )
    return PruneResult(checkpoint=written, plan=plan, source_loss=source_loss, report=report)
