"""`sparsetron plan` plans a several-rank layout in one process (torch's fake process group) and
its memory plans are the ones the real ranks build: rank 0's (which `train` prints) and the first
rank of every other pipeline stage's."""

from harness import run_distributed

from sparsetron.train.config_io import load_job_config
from sparsetron.train.plan import plan_job
from sparsetron.train.trainer import Trainer

WORLD = 4
# Tensor x data (FSDP) x expert parallelism; tensor x pipeline (two stages hold different layers).
LAYOUTS = {
    "tp2xdp2xep2": ["parallel.tensor=2", "parallel.data_parallel_shard=2", "parallel.expert=2"],
    "pp2xtp2": ["parallel.pipeline=2", "parallel.tensor=2", "trainer.grad_accum_steps=2"],
}


def job(run_dir, overrides):
    return load_job_config(
        "debug-deepseek",
        [
            "model.n_layers=4",
            "data.max_documents=100",
            "metrics.console=none",
            f"trainer.run_dir={run_dir}",
            *overrides,
        ],
    )


def built_memory_plans(run_dirs):
    """Each layout's Trainer built (nothing trained) on this rank: its memory plan."""
    plans = []
    for name, overrides in LAYOUTS.items():
        trainer = Trainer(job(run_dirs[name], overrides))
        plans.append(trainer.memory_plan)
        trainer.close()
    return plans


def test_plan_has_the_memory_plans_the_ranks_build(tmp_path):
    run_dirs = {name: str(tmp_path / name) for name in LAYOUTS}
    per_rank = run_distributed(built_memory_plans, WORLD, run_dirs, timeout=300)
    for i, (name, overrides) in enumerate(LAYOUTS.items()):
        plan = plan_job(job(run_dirs[name], overrides), WORLD)
        assert plan.memory == {rank: per_rank[rank][i] for rank in plan.memory}, name
        assert len(plan.memory) == plan.dims.pp
