"""benchmarks/moba.py in its CPU mode, smallest shape: the report comes out whole, the checks pass,
and a MoBA that computes another function gets no ratio."""

import importlib.util
import sys
from pathlib import Path

import pytest

from sparsetron.kernels.moba import moba_reference

ARGS = ["--device", "cpu", "--seqs", "256", "--configs", "32/3", "--rows", "8", "--quick", "--sink-seqs", "256"]


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "moba.py"
    spec = importlib.util.spec_from_file_location("benchmark_moba", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_cpu_report_is_whole_and_checked(bench, capsys):
    report = bench.main(ARGS)
    assert report in capsys.readouterr().out
    assert "| S | mode | density | SDPA ms | Flex ms | MoBA ms |" in report
    assert "| 256 | fwd | 0.533 |" in report and "| 256 | fwd+bwd | 0.533 |" in report
    assert "- S=256 MoBA: ok" in report and "- S=256 Flex: ok" in report
    assert "WRONG" not in report and "failed" not in report and "refused" not in report
    assert "S=32K B=512 K=3 fwd+bwd, MoBA speedup over SDPA: not measured" in report
    # The sink case: block 0 picked by a share of the queries at random, by all of them with the sink.
    sink_row = next(line for line in report.splitlines() if line.startswith("| 256 | 32 | 3 |"))
    share_random, share_sink = sink_row.split("|")[4].strip().split(" / ")
    assert share_sink == "100%" and share_random != "100%"
    assert "- sink S=256: ok" in report


def test_wrong_moba_gets_no_ratio(bench, monkeypatch):
    # K - 1 blocks instead of K: a plausible kernel bug.
    monkeypatch.setattr(bench, "moba_attention", lambda q, k, v, cu, B, K: moba_reference(q, k, v, cu, B, K - 1))
    report = bench.main(ARGS[:4] + ["--configs", "32/2", "--rows", "8", "--quick", "--sink-seqs", "256"])
    assert "- S=256 MoBA: WRONG" in report and "- S=384 B=32 K=3: WRONG" in report
    assert "- sink S=256: WRONG" in report
    for mode in ("fwd", "fwd+bwd"):
        row = next(line for line in report.splitlines() if line.startswith(f"| 256 | {mode} |"))
        cells = [cell.strip() for cell in row.split("|")[1:-1]]
        assert cells[6] == cells[7] == "refused"  # MoBA vs SDPA, MoBA vs Flex
        assert cells[10] == "—"  # no effective TFLOP/s either
