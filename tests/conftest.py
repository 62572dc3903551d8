"""Shared test helpers: tiny volumes written as real files into tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

# OpenMP threads that sleep while they wait for work instead of spinning (read once, when torch's
# OpenMP runtime loads: before torch is imported; inherited by the medseg processes the tests
# start). The same threads compute the same results; only a waiting thread no longer holds a core
# that another process of the run (or of the machine) needs: with spinning threads a test's
# training process, its DataLoader worker and anything else running shared the 2 cores so badly
# that tests/test_cli_train.py took 190 s instead of 58 s under one other busy process.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HIPPOCAMPUS = ROOT.parent / "shared" / "data" / "hippocampus"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
