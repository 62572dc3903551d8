"""scripts/bench_train.py on the CPU at a tiny size: every configuration runs and is reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medseg.models import CHECKPOINTING_MODES, CheckpointedLevels

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench_train.py"


def run_script(*arguments: str) -> str:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(SCRIPT), *arguments], capture_output=True, encoding="utf-8", errors="replace", cwd=REPO,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_step_benchmark_on_cpu(tmp_path: Path) -> None:
    pytest.importorskip("dynamic_network_architectures")
    report = tmp_path / "bench.json"
    out = run_script("--device", "cpu", "--patch", "16", "16", "16", "--batch", "1", "--steps", "2", "--warmup", "1",
                     "--no-compile", "--base-width", "4", "--max-width", "16", "--profile", "1", "--json", str(report))
    expected = ["nnunet-eager", *(f"medseg-{mode}-eager" for mode in CHECKPOINTING_MODES)]
    table = out[out.index("configuration"):]
    for name in expected:
        line = next(line for line in table.splitlines() if line.startswith(name + " "))
        assert float(line.split()[1]) > 0, line
    assert "fastest medseg setting" in out
    figures = json.loads(report.read_text(encoding="utf-8"))
    assert list(figures["configs"]) == expected
    for name in expected:
        entry = figures["configs"][name]
        assert entry["status"] == "ok" and entry["ms"] > 0 and entry["flops"] > 0
        profiled = entry["profile"]  # --profile: where the step's time goes
        assert 0 < profiled["busy_ms"] and profiled["top"] and profiled["top"][0]["ms"] > 0
    assert out.count("profiled:") == len(expected) and "aten::convolution" in out
    # Same geometry: the two networks do the same convolution work.
    assert figures["flops"]["nnunet"] == figures["flops"]["medseg"]


def test_make_large_dataset_reads(tmp_path: Path) -> None:
    from medseg.data.cases import find_dataset

    root = tmp_path / "large"
    run_script("--make-large", str(root), "--large-cases", "2", "--large-shape", "24", "24", "20")
    info = find_dataset(root)
    assert len(info.cases) == 2
    description = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    assert description["labels"] == {"0": "background", "1": "a", "2": "b"}


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_stage_levels_suffix_builds_the_unet_with_those_levels() -> None:
    bench = _bench_module()
    assert bench.run_kind("medseg-stage-compiled@2:1w") == "on"
    assert bench._base("medseg-stage-compiled-cl@1:1") == "medseg-stage-compiled-cl"
    assert bench.unet_options("medseg-stage-compiled@3:1w%0.5") == {
        "checkpointed_levels": CheckpointedLevels(encoder=3, decoder=1), "per_sample": False}
    model, cfg = bench.build("medseg-stage-compiled@3:1w", [16, 16, 16], 1, ["model.base_width=4"], 1, 3)
    assert (model.checkpointed_levels, model.per_sample, model.checkpointing) == (CheckpointedLevels(3, 1), False, "stage")
    assert cfg.model.arch == "unet"
    model, _ = bench.build("medseg-stage-compiled@1:0", [16, 16, 16], 1, ["model.base_width=4"], 1, 3)
    assert (model.checkpointed_levels, model.per_sample) == (CheckpointedLevels(1, 0), True)
    default, _ = bench.build("medseg-stage-compiled", [16, 16, 16], 1, ["model.base_width=4"], 1, 3)
    assert (default.checkpointed_levels, default.per_sample) == (CheckpointedLevels(), True)


def test_budget_suffix_sets_and_restores_the_activation_memory_budget() -> None:
    from torch._functorch import config as functorch_config

    bench = _bench_module()
    default = functorch_config.activation_memory_budget
    assert bench._base("medseg-off-compiled%0.3") == "medseg-off-compiled"
    assert bench.run_kind("medseg-stage-compiled@1:1%0.5") == "on"
    with bench.activation_budget("medseg-off-compiled%0.3"):
        assert functorch_config.activation_memory_budget == 0.3
    assert functorch_config.activation_memory_budget == default
    with bench.activation_budget("medseg-stage-compiled@1:0%0.5"):
        assert functorch_config.activation_memory_budget == 0.5
    assert functorch_config.activation_memory_budget == default
    with bench.activation_budget("medseg-off-compiled"):
        assert functorch_config.activation_memory_budget == default


def test_nnunet_configurations_build_nnunet_plain_through_the_registry() -> None:
    pytest.importorskip("dynamic_network_architectures")
    from medseg.models import SegmentationNetwork

    bench = _bench_module()
    model, cfg = bench.build("nnunet-eager", [16, 16, 16], 1, ["model.base_width=4", "model.max_width=16"], 1, 3)
    assert cfg.model.arch == "nnunet-plain" and isinstance(model, SegmentationNetwork)
    assert type(model.network).__name__ == "PlainConvUNet"
