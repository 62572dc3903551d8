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


# Step and inference estimates (medseg.memory) remembered for the whole session: a pure function of
# the config and of the data's channels, classes and spacing, all of which are in the key.
_STEP_ESTIMATES: dict[str, object] = {}
_INFERENCE_ESTIMATES: dict[str, object] = {}


def _estimate_key(cfg, *arguments) -> str:
    import json

    return json.dumps([cfg.to_dict(), *(list(a) if isinstance(a, (list, tuple)) else a for a in arguments)],
                      sort_keys=True)


@pytest.fixture
def estimates_once(monkeypatch):
    """`medseg.memory.fit` estimates each candidate it tries; tests that fit the same network search
    over many of the same candidates. With this fixture each (config, channels, classes, spacing)
    is estimated once per session, by the first fit that asks. Only `fit`'s own calls go through it
    (medseg.memory.fitting's names): a test that calls `memory.estimate` or `simulate_step` itself
    still gets a fresh estimate."""
    from medseg.memory import fitting

    step, inference = fitting.estimate, fitting.estimate_inference

    def remembered_step(cfg, in_channels, num_classes, spacing=(1.0, 1.0, 1.0)):
        key = _estimate_key(cfg, in_channels, num_classes, spacing)
        if key not in _STEP_ESTIMATES:
            _STEP_ESTIMATES[key] = step(cfg, in_channels, num_classes, spacing)
        return _STEP_ESTIMATES[key]

    def remembered_inference(cfg, in_channels, num_classes, spacing, batch):
        key = _estimate_key(cfg, in_channels, num_classes, spacing, batch)
        if key not in _INFERENCE_ESTIMATES:
            _INFERENCE_ESTIMATES[key] = inference(cfg, in_channels, num_classes, spacing, batch)
        return _INFERENCE_ESTIMATES[key]

    monkeypatch.setattr(fitting, "estimate", remembered_step)
    monkeypatch.setattr(fitting, "estimate_inference", remembered_inference)


@pytest.fixture(scope="session")
def compiled_checks(tmp_path_factory) -> dict[str, str]:
    """The torch.compile checks of tests/models/test_unet.py (compiled stages, compiled selective
    checkpointing) and tests/test_train_step.py (the compiled stage-checkpointing step, alone and
    in DistributedDataParallel), run one after the other in one fresh interpreter in UTF-8 mode
    (torch.compile's imports read source files in the locale's encoding), whose start-up and
    torch.compile's are most of their time. Between them torch._dynamo.reset() drops the compiled
    code, guards and counters, and the thread count a check set is restored. The last line each
    printed, by name ("stages", "selective", "step")."""
    import subprocess
    import sys

    from tests.models.test_unet import _COMPILED_GRADIENTS, _COMPILED_STAGES
    from tests.test_train_step import _STAGE_COMPILED_STEP

    checks = {"stages": _COMPILED_STAGES, "selective": _COMPILED_GRADIENTS, "step": _STAGE_COMPILED_STEP}
    script = ["import torch", "threads = torch.get_num_threads()"]
    for name, check in checks.items():
        script += [f"print('--- {name}', flush=True)", check, "torch._dynamo.reset()", "torch.set_num_threads(threads)"]
    store = tmp_path_factory.mktemp("compiled")  # the step's process group's file store (its sys.argv[1])
    result = subprocess.run([sys.executable, "-c", "\n".join(script), str(store)], capture_output=True,
                            encoding="utf-8", errors="replace", timeout=900, cwd=ROOT,
                            env={**os.environ, "PYTHONUTF8": "1", "PYTHONIOENCODING": "utf-8"})
    assert result.returncode == 0, result.stderr[-3000:]
    printed: dict[str, list[str]] = {}
    for line in result.stdout.splitlines():
        if line.startswith("--- ") and line[4:] in checks:
            printed[line[4:]] = []
        elif printed and line.strip():
            printed[list(printed)[-1]].append(line)
    assert set(printed) == set(checks) and all(printed.values()), result.stdout[-3000:]
    return {name: lines[-1] for name, lines in printed.items()}
