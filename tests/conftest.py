"""Shared test settings: `gpu`-marked tests are skipped where no CUDA device is present, and
without one Triton kernels run in its interpreter (decided when a kernel is defined, so here,
before any test imports one). Data tokenized at train time is cached in a temporary folder of
this session (SPARSETRON_DATA_CACHE, inherited by the processes tests launch), never in ~/.cache. Time-outs scale by
SPARSETRON_TEST_TIMEOUT_SCALE (tests/slowdown.py); the summary ends with each tier's time. The tests' shared helpers (tolerance.py, moba_tolerance.py), and
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

from slowdown import scaled, timeout_scale  # noqa: E402  (found through the path set just above)


@pytest.fixture(autouse=True, scope="session")
def _data_cache_in_a_temporary_folder(tmp_path_factory):
    os.environ["SPARSETRON_DATA_CACHE"] = str(tmp_path_factory.mktemp("data-cache"))
    yield


def pytest_collection_modifyitems(config, items):
    scale = timeout_scale()
    if scale != 1:
        for item in items:
            marker = item.get_closest_marker("timeout")
            seconds = marker.args[0] if marker else float(config.getini("timeout"))
            item.add_marker(pytest.mark.timeout(scaled(seconds)), append=False)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_TIER_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report):
    """Adds up each tier's time (tests/unit, tests/distributed, tests/gpu: set-up, call and tear-down)."""
    parts = report.nodeid.split("/")
    tier = parts[1] if len(parts) > 2 and parts[0] == "tests" else parts[0]
    _TIER_SECONDS[tier] = _TIER_SECONDS.get(tier, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    """One line of each tier's time, for the README's account of what the suite costs."""
    if _TIER_SECONDS:
        tiers = ", ".join(f"{tier} {seconds / 60:.1f} min" for tier, seconds in sorted(_TIER_SECONDS.items()))
        terminalreporter.write_line(f"time per tier: {tiers}")


@pytest.fixture(autouse=True)
def _torch_threads_are_left_as_found():
    """A test (or a benchmark's main called in-process) that sets torch's thread count and keeps it
    slows every later test of the session: one thread halved the speed of the rest of the unit tier."""
    threads = torch.get_num_threads()
    yield
    left = torch.get_num_threads()
    if left != threads:
        torch.set_num_threads(threads)
        pytest.fail(f"the test left torch with {left} threads instead of {threads}")
