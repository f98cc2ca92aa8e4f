"""The experiment scripts (experiments/, minutes of training each, run by hand) stay importable and
their command lines parse: each one's `--help` runs and names its options."""

import importlib.util
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
SCRIPTS = sorted(p.stem for p in EXPERIMENTS.glob("*.py") if p.stem != "runs")


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_imports_and_its_command_line_parses(name, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))  # the scripts import their shared runs.py
    spec = importlib.util.spec_from_file_location(f"experiment_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--help"])
    with pytest.raises(SystemExit) as stopped:
        module.main()
    assert stopped.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_every_script_is_checked():
    assert SCRIPTS == ["entropy_collapse", "expert_pruning", "granularity", "pre_attention_router", "upcycling"]
