"""Shared test settings: `gpu`-marked tests are skipped where no CUDA device is present, and
without one Triton kernels run in its interpreter (decided when a kernel is defined, so here,
before any test imports one)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
