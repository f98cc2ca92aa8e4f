"""benchmarks/checkpoint_save.py on a 1 MB model: both kinds of save commit and the table has its columns."""

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_the_benchmark_saves_both_ways_and_prints_its_table(tmp_path):
    spec = importlib.util.spec_from_file_location("benchmark_checkpoint_save", BENCHMARKS / "checkpoint_save.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    table = bench.main(["--mb", "1", "--width", "256", "--reps", "1", "--folder", str(tmp_path)])
    assert "| sync save s | async blocked s | async total s | blocked / sync |" in table
    assert "XXH3 checksum of the saved files" in table
    for kind in ("sync", "async"):
        assert [p.name for p in (tmp_path / kind).iterdir()] == ["step_00000001"]
        assert (tmp_path / kind / "step_00000001" / ".complete").is_file()
