"""benchmarks/feature_cost.py on a small recipe: every variant builds and steps, and the table gives
each one's ratio to the recipe as shipped."""

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_every_variant_trains_and_is_reported(tmp_path):
    spec = importlib.util.spec_from_file_location("benchmark_feature_cost", BENCHMARKS / "feature_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    output = tmp_path / "cost.md"
    report = module.main(["--recipe", "debug-deepseek", "--rounds", "1", "--output", str(output)])
    rows = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == list(module.VARIANTS)
    assert rows[0].endswith("| 1.00 |")
    assert output.read_text().strip() == report.strip()
