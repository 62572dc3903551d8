"""medseg.memory: the predicted peak of a training step, its breakdown, and the fit built on it.

The estimator runs the real training step on fake tensors and counts live storages. Two checks tie
that count to reality on the CPU: the same run on real tensors gives the same count, and that count
equals the bytes the CPU allocator itself reports (PyTorch profiler memory events). What remains
CUDA-specific (allocator rounding, cuDNN workspaces, kernels' scratch space) is compared on a GPU
by scripts/bench_memory.py and by the gpu-marked test at the end.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from medseg import config, memory
from medseg.memory import fitting
from medseg.memory.estimator import simulate_step
from medseg.models import CHECKPOINTING_MODES
from medseg.errors import ConfigError, MedsegError

CLASSES = 3


def tiny(*overrides: str):
    """A small network (widths 8..32) at patch 32³, fp16, batch 2: estimates in about a second."""
    return config.load(None, [
        "train.patch_size=[32,32,32]", "train.batch_size=2", "model.base_width=8", "model.max_width=32",
        "train.amp=fp16", *overrides,
    ])


_cache: dict[tuple, memory.MemoryReport] = {}


def estimate(*overrides: str, channels: int = 1) -> memory.MemoryReport:
    key = (overrides, channels)
    if key not in _cache:
        _cache[key] = memory.estimate(tiny(*overrides), channels, CLASSES)
    return _cache[key]


# --- parse_size and the allocator's rounding ------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("24GiB", 24 * 2**30), ("24GB", 24 * 2**30), ("24g", 24 * 2**30), ("24 gb", 24 * 2**30),
    ("24Gi", 24 * 2**30), ("8000MiB", 8000 * 2**20), ("512M", 512 * 2**20), ("1.5TiB", int(1.5 * 2**40)),
    (".5G", 2**29), ("64k", 64 * 1024), ("4096B", 4096), (" 2 GiB ", 2 * 2**30),
])
def test_parse_size(text, expected):
    assert memory.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "24", "GB", "24 XB", "24iB", "-1G", "1.5.5G", "1e3G", "0GB", "twelve GB"])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError, match="memory size"):
        memory.parse_size(text)


@pytest.mark.parametrize("nbytes, counted", [
    (0, 0), (1, 512), (512, 512), (513, 1024), (5 * 2**20 + 1, 5 * 2**20 + 512),
    (11 * 2**20, 12 * 2**20),  # 1 MiB left in its 12 MiB segment: not split, the whole segment counts
    (13 * 2**20 - 100, 14 * 2**20),
    (12 * 2**20 + 2**19, 12 * 2**20 + 2**19),  # 1.5 MiB left over: split off
    (256 * 2**20, 256 * 2**20),
])
def test_block_bytes(nbytes, counted):
    assert memory.block_bytes(nbytes) == counted


# --- the estimate -----------------------------------------------------------------------------------

def test_breakdown_matches_the_model_and_the_inputs():
    from medseg.models import build_model

    report = estimate()
    # The float32 image and label batches (2 × 32³ each) are alive throughout the step.
    inputs = 2 * memory.block_bytes(2 * 32**3 * 4)
    assert report.activations >= inputs and report.total >= report.parameters + report.optimizer_state + inputs
    assert 0 <= report.gradients <= report.parameters
    model = build_model(tiny(), 1, CLASSES, (1.0, 1.0, 1.0))
    assert report.parameters == sum(memory.block_bytes(p.numel() * 4) for p in model.parameters())
    # SGD with momentum: one buffer per parameter, alive throughout the step.
    assert report.optimizer_state == report.parameters
    assert (report.patch_size, report.batch_size, report.amp, report.checkpointing) == ((32, 32, 32), 2, "fp16", "off")
    assert json.loads(json.dumps(report.to_dict()))["patch_size"] == [32, 32, 32]
    assert "GiB" in report.summary()


def test_adamw_keeps_two_moments_per_parameter():
    report = estimate("train.optimizer=adamw")
    assert report.optimizer_state == 2 * report.parameters


def test_grows_with_batch_linearly_in_activations():
    one, two, three = (estimate(f"train.batch_size={b}") for b in (1, 2, 3))
    assert one.total < two.total < three.total
    first, second = two.activations - one.activations, three.activations - two.activations
    assert second == pytest.approx(first, rel=0.05)
    # Almost all of the activations scale with the batch.
    assert one.activations > 0.8 * first


def test_grows_with_patch():
    sizes = [estimate(f"train.patch_size=[{n},{n},{n}]").total for n in (32, 48, 64)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1] / 4


def test_checkpointing_lowers_activations_substantially():
    off, stage = estimate(), estimate("model.checkpointing=stage")
    assert stage.activations < 0.75 * off.activations
    assert stage.parameters == off.parameters


def test_fp32_activations_exceed_fp16():
    fp16, fp32, bf16 = estimate(), estimate("train.amp=off"), estimate("train.amp=bf16")
    assert fp32.activations > 1.5 * fp16.activations
    assert bf16.activations == pytest.approx(fp16.activations, abs=4096)  # same sizes; fp16 adds the GradScaler
    assert estimate("train.amp=auto").amp == "fp16"  # what train uses on a GPU


def test_channels_and_classes_add_memory():
    assert estimate(channels=4).total > estimate().total
    assert memory.estimate(tiny(), 1, 14).total > estimate().total


def test_group_norm_runs_in_float32_under_autocast_as_on_cuda():
    # CUDA autocast casts group_norm's input to float32; the estimate must see those copies.
    assert estimate("model.norm=group").activations > 1.3 * estimate().activations


def test_rejected_configurations_raise_config_error():
    with pytest.raises(ConfigError):
        memory.estimate(tiny("model.norm=batch", "model.checkpointing=stage"), 1, CLASSES)
    with pytest.raises(ConfigError):
        memory.estimate(tiny("model.depth=6"), 1, CLASSES)


# --- the tracker against reality on the CPU -----------------------------------------------------------

def _exact(nbytes: int) -> int:
    return nbytes


def test_tracker_agrees_with_a_real_run_and_with_the_cpu_allocator():
    """Two links from the estimate to reality, in float32 on the CPU:

    1. fake tensors must die when real ones do: the fake run's count equals the same tracker's
       count on a real training step;
    2. the tracker's count of live storages must be what the allocator holds: the CPU allocator's
       own allocation and free events (profiler memory events), summed in time order, reach the
       same peak.

    The real step runs on one intra-op thread: with more, oneDNN allocates per-thread scratch
    inside an operator (the 1×1×1 head convolution's backward), which no tensor holds and which
    the estimate, rightly, does not count (CUDA kernels have no such scratch).
    """
    profiler = pytest.importorskip("torch.profiler")
    cfg = tiny("train.amp=off")
    holder = {}

    def profiled():
        holder["profile"] = profiler.profile(activities=[profiler.ProfilerActivity.CPU], profile_memory=True)
        return holder["profile"]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        real = simulate_step(cfg, 1, CLASSES, (1.0, 1.0, 1.0), fake=False, rounding=_exact, around_step=profiled)
    finally:
        torch.set_num_threads(threads)
    fake = simulate_step(cfg, 1, CLASSES, (1.0, 1.0, 1.0), fake=True, rounding=_exact)
    assert fake.to_dict() == real.to_dict()

    try:
        events = holder["profile"].profiler.kineto_results.events()
        changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    except AttributeError:
        pytest.skip("this PyTorch's profiler does not expose its memory events")
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    assert len(changes) > 100
    assert real.total == pytest.approx(peak, rel=0.01)


def test_fake_run_under_autocast_and_checkpointing_counts_what_a_real_run_counts():
    # Cached weight casts, recomputation in backward. bf16 convolutions are slow on CPUs without
    # bf16 instructions: a smaller patch.
    cfg = tiny("train.amp=bf16", "model.checkpointing=stage", "train.patch_size=[16,16,16]")
    fake = simulate_step(cfg, 1, CLASSES, (1.0, 1.0, 1.0), fake=True, rounding=_exact)
    real = simulate_step(cfg, 1, CLASSES, (1.0, 1.0, 1.0), fake=False, rounding=_exact)
    # The CPU's bf16 norm kernel keeps its statistics in float32 where the meta kernel says bf16:
    # a few bytes per norm layer.
    assert fake.total == pytest.approx(real.total, rel=1e-3)
    assert fake.parameters == real.parameters and fake.optimizer_state == real.optimizer_state


# --- fit ------------------------------------------------------------------------------

MiB = 2**20


@pytest.fixture
def shared_estimates(estimates_once):
    """The fit tests search over many of the same configurations: estimate each once (conftest's
    `estimates_once`, shared with tests/test_memory_run.py's fits of the same network)."""


def test_stage_checkpointing_per_sample_lowers_the_peak(monkeypatch):
    # The checkpointed (finest) stages recomputed one sample at a time: the backward's temporaries
    # there are halved. The estimator builds the network with medseg.models.build_model.
    import functools

    from medseg import models

    cfg = tiny("model.checkpointing=stage")
    per_sample = simulate_step(cfg, 1, CLASSES, (1.0, 1.0, 1.0)).total
    monkeypatch.setattr(models, "build_model", functools.partial(models.build_model, per_sample=False))
    whole_batch = simulate_step(cfg, 1, CLASSES, (1.0, 1.0, 1.0)).total
    print(f"\nstage checkpointing peak: per sample {per_sample / MiB:.1f} MiB, whole batch {whole_batch / MiB:.1f} MiB")
    assert per_sample < 0.9 * whole_batch


# The fit tests' budgets are far below the default overhead's constant: a tenth of the budget instead.
TENTH = memory.Overhead(0.1, 0)


def fit(cfg, budget, **options):
    options.setdefault("overhead", TENTH)
    return memory.fit(cfg, 1, CLASSES, (1.0, 1.0, 1.0), budget, **options)


def work(chosen) -> int:
    return math.prod(chosen.train.patch_size) * chosen.train.batch_size


def test_fit_fills_a_large_budget_growing_patch_and_batch(shared_estimates):
    budget = 128 * MiB
    chosen, report = fit(tiny(), budget)
    assert 0.8 * budget <= report.total <= budget
    # Without the data, the run is the step, the batch rendered ahead and the overhead.
    assert report.total == report.step.total + report.next_batch + budget // 10
    assert work(chosen) > 4 * 32**3 * 2 and chosen.train.batch_size >= 2
    patch = chosen.train.patch_size
    assert patch == [patch[0]] * 3 and patch[0] % 8 == 0  # the configured shape, a multiple of the divisor
    assert chosen.model.checkpointing in memory.STEP_TIME
    # The report is the estimate of the chosen configuration.
    assert (report.patch_size, report.batch_size, report.checkpointing) == (
        tuple(patch), chosen.train.batch_size, chosen.model.checkpointing)
    assert simulate_step(chosen, 1, CLASSES, (1.0, 1.0, 1.0)).total == report.step.total  # not remembered


def test_fit_respects_max_patch_and_max_batch_and_then_prefers_no_checkpointing(shared_estimates):
    # The patch cap binds: the capped patch (not a smaller one with more samples), the batch grown.
    chosen, report = fit(tiny(), 128 * MiB, max_patch=(40, 44, 40))
    assert chosen.train.patch_size == [40, 40, 40] and chosen.train.batch_size > 3
    assert report.total <= 128 * MiB
    # Both caps bind: every mode gives the same work, and the cheapest mode wins.
    chosen, report = fit(tiny(), 128 * MiB, max_patch=(40, 44, 40), max_batch=3)
    assert (chosen.train.patch_size, chosen.train.batch_size, chosen.model.checkpointing) == ([40, 40, 40], 3, "off")


def test_fit_within_both_caps_takes_one_estimate(monkeypatch, shared_estimates):
    # When the capped patch and batch fit without checkpointing nothing can do more work: no search.
    calls = []
    remembered = fitting.estimate
    monkeypatch.setattr(fitting, "estimate", lambda *args, **kw: calls.append(args) or remembered(*args, **kw))
    chosen, report = fit(tiny(), 256 * MiB, max_patch=(40, 40, 40), max_batch=3)
    assert (chosen.train.patch_size, chosen.train.batch_size, chosen.model.checkpointing) == ([40, 40, 40], 3, "off")
    assert len(calls) == 1 and report.total <= 256 * MiB


def test_fit_weighs_checkpointing_by_its_step_time(monkeypatch, shared_estimates):
    # Only modes in step_time are candidates: with "stage" nearly free it buys far more voxels per
    # step and wins; at three times the step time it loses.
    cheap, _ = fit(tiny(), 128 * MiB, step_time={"off": 1.0, "stage": 1.05})
    dear, _ = fit(tiny(), 128 * MiB, step_time={"off": 1.0, "stage": 3.0})
    assert (cheap.model.checkpointing, dear.model.checkpointing) == ("stage", "off")
    assert work(cheap) > 1.3 * work(dear)
    only_off, _ = fit(tiny(), 128 * MiB, step_time={"off": 1.0})
    assert only_off.model.checkpointing == "off" and work(only_off) == work(dear)
    # A mode in the table that the network does not have (yet) is skipped.
    from medseg import models

    monkeypatch.setattr(models, "CHECKPOINTING_MODES", ("off", "stage"))
    without, _ = fit(tiny(), 128 * MiB, step_time={"off": 1.0, "selective": 1.0, "stage": 1.05, "future": 0.5})
    assert without.to_dict() == cheap.to_dict()
    with pytest.raises(MedsegError, match="step time"):
        fit(tiny(), 128 * MiB, step_time={"future": 0.5})


def test_the_default_step_times_are_read_only():
    with pytest.raises(TypeError):
        memory.STEP_TIME["stage"] = 1.0  # type: ignore[index]
    assert memory.STEP_TIME["off"] == 1.0 and set(memory.STEP_TIME) == set(CHECKPOINTING_MODES)


def test_fit_shrinks_the_patch_when_the_request_does_not_fit_and_keeps_batch_two(shared_estimates):
    cfg = tiny("train.patch_size=[64,64,64]", "train.batch_size=4")
    budget = 60 * MiB  # 64³ needs 100 MiB at batch 2 even with stage checkpointing
    # The data's extent is the requested patch (max_patch): the patch can only shrink.
    chosen, report = fit(cfg, budget, overhead=memory.Overhead(0.0, 0), max_patch=(64, 64, 64))
    patch = chosen.train.patch_size
    # A smaller cube, then single axes grown by half the divisor (8 here) into what is left.
    assert max(patch) < 64 and all(n % 8 == 0 for n in patch) and max(patch) - min(patch) <= 8
    assert chosen.train.batch_size >= 2 and report.total <= budget
    # Batch 1 only when asked for (or when nothing with 2 fits): then a larger patch.
    single, report = fit(cfg, budget, overhead=memory.Overhead(0.0, 0), max_patch=(64, 64, 64), max_batch=1)
    assert single.train.batch_size == 1 and report.total <= budget
    assert math.prod(single.train.patch_size) > math.prod(patch)


def test_fit_rejects_bad_caps():
    with pytest.raises(ConfigError, match="max_batch"):
        fit(tiny(), 256 * MiB, max_batch=0)
    with pytest.raises(ConfigError, match="max_patch"):
        fit(tiny(), 256 * MiB, max_patch=(64, 64))


def test_fit_raises_with_numbers_when_nothing_fits():
    # At a fixed depth of 3 the 16³ patch cannot shrink, and the cap keeps it from growing: one
    # patch to try.
    cfg = tiny("model.depth=3", "train.patch_size=[16,16,16]")
    with pytest.raises(MedsegError) as raised:
        memory.fit(cfg, 1, CLASSES, (1.0, 1.0, 1.0), budget_bytes=2**20, overhead=TENTH, max_patch=(16, 16, 16))
    message = str(raised.value)
    assert "\n" not in message and "nothing fits in 0.00 GiB" in message and "needs" in message


# --- on a GPU ---------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_estimate_matches_a_measured_step_on_the_gpu():
    cfg = config.load(None, ["train.patch_size=[64,64,64]", "train.batch_size=2", "train.amp=fp16"])
    predicted = memory.estimate(cfg, 1, CLASSES).total
    measured = memory.measure(cfg, 1, CLASSES)["max_memory_allocated"]
    assert predicted == pytest.approx(measured, rel=0.10)


def test_memory_command_json():
    from typer.testing import CliRunner

    from medseg.cli import app
    from tests.conftest import ROOT

    runner = CliRunner()
    overrides = ["--set", f"data.dataset={ROOT / 'sample_data'}", "--set", "train.patch_size=[32,32,24]",
                 "--set", "model.base_width=8", "--set", "model.max_width=32"]
    result = runner.invoke(app, ["memory", *overrides, "--gpu-memory", "1GiB", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    rows = {(r["amp"], r["checkpointing"]): r for r in data["rows"]}
    assert set(rows) == {(amp, mode) for amp in ("off", "fp16") for mode in CHECKPOINTING_MODES}
    assert rows[("fp16", "stage")]["total"] < rows[("fp16", "off")]["total"] < rows[("off", "off")]["total"]
    assert all(row["fits"] == (row["run_total"] <= 1024 * MiB) for row in rows.values())
    assert all(row["run_total"] > row["total"] for row in rows.values())
    assert data["budget"] == 1024 * MiB and data["fit"]["total"] <= 1024 * MiB
    parts = ("step", "next_batch", "resident_volumes", "validation", "inference", "validation_buffers", "overhead")
    assert set(data["run"]) >= {*parts, "total"} and set(data["fit"]) >= {*parts, "total"}
    assert set(data["fit"]) >= {"patch_size", "batch_size", "checkpointing", "amp"}
    bad = runner.invoke(app, ["memory", *overrides, "--gpu-memory", "lots"])
    assert bad.exit_code == 2 and "lots" in bad.output and "Traceback" not in bad.output
