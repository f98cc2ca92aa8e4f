"""Shared test settings: `gpu`-marked tests are skipped where no CUDA device is present, and
without one Triton kernels run in its interpreter (decided when a kernel is defined, so here,
before any test imports one). The tests' shared helpers (tolerance.py, moba_tolerance.py), and
benchmarks/report.py which the benchmark scripts the tests load import, are importable by name."""

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_HERE = Path(__file__).resolve().parent
for folder in (_HERE, _HERE.parent / "benchmarks"):  # the benchmarks' shared `report` too
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
