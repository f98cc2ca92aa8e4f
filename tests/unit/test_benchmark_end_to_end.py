"""benchmarks/end_to_end.py and anchor_llama.py without running a trainer: the anchor computes a real
MoE and counts the parameters sparsetron counts, the timed window is read from metrics.jsonl,
failures are named, and the table gives ratios only where both sides measured.
(A real CPU run of both sides is in test_benchmark_gpu_suite.py's dry run.)"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparsetron.model.params import active_params

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def e2e():
    return load("end_to_end")


@pytest.fixture(scope="module")
def anchor():
    return load("anchor_llama")


@pytest.mark.parametrize("model", ["dense", "moe"])
def test_anchor_has_the_recipes_shapes_and_active_params(e2e, anchor, model):
    args = e2e.parse(["--device", "cpu", "--warmup", "2", "--steps", "1"])
    _, job = e2e.job_for(args, model, "unused")
    llama = anchor.Llama(anchor.parse(e2e.anchor_argv(args, job)))
    assert llama.active_params() == active_params(job.model, job.attention, job.moe)
    # The real recipe's shapes reach the anchor too.
    _, big = e2e.job_for(e2e.parse(["--device", "cuda"]), model, "unused")
    a = anchor.parse(e2e.anchor_argv(args, big))
    assert (a.dim, a.layers, a.heads, a.seq, a.batch, a.vocab) == (2048, 16, 16, 4096, 2, 32000)
    assert (a.experts, a.top_k, a.expert_hidden) == ((32, 4, 704) if model == "moe" else (0, 4, 704))


def test_anchor_moe_equals_each_token_through_its_own_experts(anchor):
    torch.manual_seed(0)
    moe = anchor.MoE(16, 6, 2, 8).double()
    x = torch.randn(37, 16, dtype=torch.float64)
    probs = moe.router(x).softmax(-1)
    weights, experts = probs.topk(2, -1)
    expected = torch.zeros_like(x)
    for t in range(len(x)):
        for w, e in zip(weights[t], experts[t], strict=True):
            h1, h3 = (x[t] @ moe.w13[e]).chunk(2, -1)
            expected[t] += w * ((F.silu(h1) * h3) @ moe.w2[e])
    torch.testing.assert_close(moe(x), expected)


def write_metrics(path: Path, steps: list[int]):
    records = [{"step": 0, "eval/loss": 5.0}]
    records += [
        {"step": s, "tokens_per_s": 1000.0 * s, "mfu": 0.01 * s, "memory/max_allocated_gib": 2.0} for s in steps
    ]
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_the_timed_window_is_the_last_log_right_after_the_warm_up(e2e, tmp_path):
    args = e2e.parse(["--device", "cpu", "--warmup", "4", "--steps", "3"])
    write_metrics(tmp_path / "ok", [4, 7])
    assert e2e.sparsetron_result(tmp_path / "ok", args) == {"tokens_per_s": 7000.0, "mfu": 0.07, "peak_memory_gib": 2.0}
    write_metrics(tmp_path / "short", [4, 6])  # a run that stopped early
    with pytest.raises(ValueError, match=r"steps \[4, 6\]"):
        e2e.sparsetron_result(tmp_path / "short", args)


def test_steps_beyond_the_warm_up_window_are_refused_by_name(e2e, capsys):
    with pytest.raises(SystemExit):
        e2e.parse(["--warmup", "2", "--steps", "3"])
    assert "--steps 3 must be in [1, --warmup 2]" in capsys.readouterr().err


def test_failures_are_named(e2e, tmp_path):
    py = sys.executable
    assert e2e.launch([py, "-c", "print(1)"], 30, tmp_path / "a.log") == (None, "1\n")
    error, _ = e2e.launch([py, "-c", "import time; time.sleep(5)"], 0.5, tmp_path / "b.log")
    assert error == "timeout after 0 s" or error.startswith("timeout")
    error, _ = e2e.launch(
        [py, "-c", "raise SystemExit('torch.OutOfMemoryError: CUDA out of memory')"], 30, tmp_path / "c.log"
    )
    assert error == "OOM"
    error, _ = e2e.launch([py, "-c", "import sys; print('boom'); sys.exit(3)"], 30, tmp_path / "d.log")
    assert error == "failed (exit 3): boom"


def test_table_gives_ratios_only_where_both_sides_measured(e2e):
    side = {"tokens_per_s": 50000.0, "mfu": 0.25, "peak_memory_gib": 40.0}
    results = {
        "dense": {
            "active_params": 887_687_168,
            "sparsetron": {"tokens_per_s": 75000.0, "mfu": 0.45, "peak_memory_gib": 20.0},
            "anchor": side,
            "sparsetron_wall_s": 61.0,
            "anchor_wall_s": 55.0,
        },
        "moe": {
            "active_params": 611_911_680,
            "sparsetron": "OOM",
            "anchor": side,
            "sparsetron_wall_s": 9.0,
            "anchor_wall_s": 50.0,
        },
    }
    lines = e2e.table(results)
    assert "| dense | 0.888B | sparsetron | 75,000 | 45.0 | 20.0 | 61 |" in lines
    assert "| dense | | sparsetron / anchor | 1.50x | 1.80x | 0.50x | |" in lines
    assert "| moe | 0.612B | sparsetron | OOM |  |  | 9 |" in lines
    assert "| moe | | sparsetron / anchor | not measured | not measured | not measured | |" in lines


def test_a_slow_first_run_may_use_what_later_runs_do_not_need(e2e):
    reserve = e2e.RESERVE_S
    assert e2e.run_timeout(300.0, 4) == 300.0 - 3 * reserve
    assert e2e.run_timeout(100.0, 2) == 100.0 - reserve
    assert e2e.run_timeout(60.0, 1) == 60.0  # the last run takes all that is left
    assert e2e.run_timeout(120.0, 4) == 30.0  # little left: equal shares, never less
