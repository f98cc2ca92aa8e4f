"""benchmarks/gpu_suite.sh --dry-run on the CPU: every part runs at tiny sizes (or is skipped where it
needs CUDA) and leaves its table under $OUT; a part that hangs or fails is named, the next one still
runs, and the suite exits non-zero."""

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from slowdown import scaled

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"


def run_suite(out: Path, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    # The suite puts this checkout on PYTHONPATH itself; an inherited one must not decide.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OUT": str(out)} | env
    return subprocess.run(
        ["bash", str(SUITE), "--dry-run"], env=env, capture_output=True, text=True, timeout=scaled(timeout)
    )


def status_rows(out: Path) -> dict[str, list[str]]:
    rows = {}
    for line in (out / "suite.md").read_text().splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) == 5 and cells[0] not in ("part", "---"):
            rows[cells[0]] = cells[1:]
    return rows


# The dry run's parts take about 50 s on a quiet 2-core CPU; on a loaded host they are held to
# three times the GPU run's budgets (SUITE_TIME_SCALE), and the test's time-out is above that.
DRY_SCALE = 3
DRY_TIMEOUT = 540 * DRY_SCALE + 120


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    return run_suite(out, PYTHON=sys.executable, SUITE_TIME_SCALE=str(DRY_SCALE), timeout=DRY_TIMEOUT), out


@pytest.mark.timeout(DRY_TIMEOUT + 60)
def test_dry_run_runs_every_part_and_writes_its_table(dry_run):
    result, out = dry_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{p}.txt"
        for p in ("pytest_gpu", "moe_layer", "moba", "doc_attention", "context_parallel", "ep_overlap", "end_to_end")
    ) + ["suite.md"]
    rows = status_rows(out)
    assert rows["pytest_gpu"][3] == "skipped: needs CUDA (tests/gpu is skipped without it)"
    for part in ("moe_layer", "moba", "doc_attention", "context_parallel", "ep_overlap", "end_to_end"):
        budget, granted, wall, status = rows[part]
        assert status == "ok" and 0 <= int(wall) <= int(granted), rows[part]
    assert "all parts ok" in result.stdout.splitlines()[-1]
    texts = {p.stem: p.read_text() for p in out.glob("*.txt")}
    assert "transformers Qwen3MoeSparseMoeBlock" in texts["moe_layer"]
    assert "- S=256 MoBA: ok" in texts["moba"]
    assert "| 128 | 4/2 | 3 | fwd+bwd | varlen (CPU stand-in) |" in texts["doc_attention"]
    assert "WRONG" not in texts["doc_attention"] + texts["moba"]
    # The GPU run's code path of the context-parallel op times: each rank's chunks beside the whole op.
    assert "| 256 | varlen | 2 | allgather rank 0: queries [0, 64) and [192, 256) |" in texts["context_parallel"]
    assert "DIFFERS" not in texts["context_parallel"] and "CPU/gloo" not in texts["context_parallel"]
    # Both sides of the end-to-end run measured something, so a ratio was printed.
    assert re.search(r"\| dense \| \| sparsetron / anchor \| \d+\.\d\dx \|", texts["end_to_end"])
    assert "SIMULATED link" in texts["ep_overlap"]
    assert "Suite wall time" in (out / "suite.md").read_text()


def fake_python(tmp_path: Path) -> Path:
    """A python that fails in moe_layer, hangs in moba, succeeds in doc_attention, and is python elsewhere."""
    fake = tmp_path / "python"
    fake.write_text(
        '#!/bin/sh\ncase "$*" in\n'
        "  *moe_layer.py*) echo broken; exit 3 ;;\n"
        "  *moba.py*) sleep 60 ;;\n"
        "  *doc_attention.py*) echo fine; exit 0 ;;\n"
        f'esac\nexec {sys.executable} "$@"\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return fake


def test_a_failing_and_a_hanging_part_are_named_and_the_suite_goes_on(tmp_path):
    out = tmp_path / "out"
    result = run_suite(
        out, PYTHON=str(fake_python(tmp_path)), SUITE_PARTS="moe_layer moba doc_attention", BUDGET_moba="5"
    )
    assert result.returncode == 1
    rows = status_rows(out)
    assert rows["moe_layer"][3] == "FAILED (exit 3)"
    assert (out / "moe_layer.txt").read_text() == "broken\n"
    assert rows["moba"][3] == "TIMEOUT after 5 s" and int(rows["moba"][2]) < 20
    assert rows["doc_attention"][3] == "ok" and (out / "doc_attention.txt").read_text() == "fine\n"
    assert result.stdout.splitlines()[-1].endswith("parts failed or timed out: moe_layer moba.")


def test_an_unknown_part_is_refused_by_name(tmp_path):
    result = run_suite(tmp_path, PYTHON=sys.executable, SUITE_PARTS="moba speed")
    assert result.returncode == 2
    assert "SUITE_PARTS: unknown part 'speed'" in result.stdout


def test_without_cuda_the_real_run_stops_at_the_prerequisites(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"OUT": str(tmp_path), "PYTHON": sys.executable, "SUITE_PARTS": "doc_attention", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(["bash", str(SUITE)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "PREREQUISITE: torch sees no CUDA device" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["suite.md"]
