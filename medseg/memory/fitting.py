"""Choosing patch, batch and checkpointing for a GPU memory budget, with the estimator.

`fit` searches the configurations of one network for the one that trains fastest within a
budget; `fit_to_data` is the fit `medseg train --gpu-memory` runs (the patch and batch capped by
the training data); `overview` is what `medseg memory` shows.
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from medseg.config import Config
from medseg.errors import ConfigError, MedsegError
from medseg.memory.estimator import MemoryReport, estimate, estimate_inference
from medseg.memory.run import (OVERHEAD, Overhead, RunData, RunReport, next_batch_bytes, resident_allowance,
                               run_data, validation_buffer_bytes)
from medseg.memory.sizes import GiB, parse_size

__all__ = ["STEP_TIME", "fit", "fit_to_data", "overview"]

# Time of one training step per checkpointing mode relative to "off", as `medseg train` runs them
# on CUDA (measured with scripts/bench_train.py: docs/benchmarks.md, "Activation checkpointing").
# The default of `fit(step_time=...)`; modes missing from it (or from
# medseg.models.CHECKPOINTING_MODES) are never chosen.
STEP_TIME: Mapping[str, float] = MappingProxyType({"off": 1.0, "selective": 1.09, "stage": 1.58})

_MAX_SCALE = 4.0  # patches up to this many times the configured size per axis
_TIE = 0.05  # candidates within this fraction of the most work count as equal
_SHRINK = 0.5  # a patch is traded for batch down to at most this fraction of the largest at batch 2
_NO_BATCH_CAP = 1 << 16  # max_batch=None


class _Candidate(NamedTuple):
    work: float  # voxels per unit of step time
    mode: str
    patch: tuple[int, ...]
    batch: int


class _Estimates:
    """The run's memory (`RunReport`) for one network, data and budget, the step's estimate
    remembered per (patch, batch, checkpointing) and validation's per patch."""

    def __init__(self, cfg: Config, in_channels: int, num_classes: int, spacing: Sequence[float],
                 budget: int | None, overhead: Overhead, data: RunData | None) -> None:
        self.cfg, self.in_channels, self.num_classes, self.spacing = cfg, in_channels, num_classes, spacing
        self.budget, self.overhead, self.data = budget, overhead, data
        self.cache: dict[tuple, RunReport | None] = {}
        self.validation: dict[tuple, tuple[int, int]] = {}

    def report(self, patch: Sequence[int], batch: int, mode: str) -> RunReport | None:
        """The run's report; None where `build_model` rejects the configuration (checkpointing with
        batch norm, a patch too small for a fixed depth)."""
        key = (tuple(int(n) for n in patch), batch, mode)
        if key not in self.cache:
            try:
                step = estimate(_candidate(self.cfg, patch, batch, mode), self.in_channels, self.num_classes,
                                self.spacing)
            except ConfigError:
                self.cache[key] = None
            else:
                self.cache[key] = self._run(step)
        return self.cache[key]

    def fits(self, patch: Sequence[int], batch: int, mode: str) -> bool:
        report = self.report(patch, batch, mode)
        return report is not None and self.budget is not None and report.total <= self.budget

    def smallest(self) -> RunReport | None:
        """The report with the smallest peak (for the message when nothing fits)."""
        reports = [r for r in self.cache.values() if r is not None]
        return min(reports, key=lambda r: r.total) if reports else None

    def _run(self, step: MemoryReport) -> RunReport:
        volumes, inference, buffers = 0, 0, 0
        if self.data is not None:
            allowance = resident_allowance(self.budget) if self.budget is not None else self.data.volume_bytes
            # Volumes within the allowance are resident; beyond it they may still be (the bound
            # is from above), so the allowance itself is reserved.
            volumes = min(self.data.volume_bytes, allowance)
            if self.data.validation_shape is not None:
                inference, buffers = self._validation(step.patch_size)
        return RunReport(step, next_batch_bytes(step.patch_size, step.batch_size, self.in_channels), volumes,
                         inference, buffers, self.overhead.bytes(self.budget or 0), self.budget)

    def _validation(self, patch: tuple[int, ...]) -> tuple[int, int]:
        # Validation's windows have the training patch; its memory does not depend on batch or checkpointing.
        if patch not in self.validation:
            validate, data = self.cfg.validate, self.data
            assert data is not None and data.validation_shape is not None
            inference = estimate_inference(_candidate(self.cfg, patch, 1, "off"), self.in_channels,
                                           self.num_classes, self.spacing, validate.sw_batch_size)
            buffers = validation_buffer_bytes(data.validation_shape, patch, self.in_channels, self.num_classes,
                                              validate.sw_batch_size, validate.mirror, self.budget)
            self.validation[patch] = (inference, buffers)
        return self.validation[patch]


def fit(cfg: Config, in_channels: int, num_classes: int, spacing: Sequence[float], budget_bytes: int,
        overhead: Overhead = OVERHEAD, *, data: RunData | None = None, max_patch: Sequence[int] | None = None,
        max_batch: int | None = None, step_time: Mapping[str, float] = STEP_TIME) -> tuple[Config, RunReport]:
    """The configuration that trains fastest with the whole run within `budget_bytes`.

    The run (`medseg.memory.run.RunReport`): the step, the batch rendered ahead, the `overhead`
    kept free of the budget, and with `data` (`run_data`: the training volumes and the validation
    volumes' extent) the resident volumes and validation; the budget must hold its total.

    "Fastest" is the most training work per unit of time: voxels per step (patch volume × batch)
    divided by the checkpointing mode's relative step time (`step_time`). The candidates:

    - patch: the configured patch scaled by one factor on every axis (aspect ratio kept, each axis
      a multiple of the network's divisor for the configured patch), smaller or larger, up to
      4 times the configured size and at most `max_patch` per axis (the training data's extent
      in voxels at the target spacing: a patch beyond the data only adds padding);
    - batch: at least 2, as nnU-Net plans (1 only when nothing with 2 fits, or `max_batch` is 1),
      at most `max_batch` (None: as many as fit);
    - checkpointing: every mode of `medseg.models.CHECKPOINTING_MODES` with a time in `step_time`;
      the configured mode and batch size are not kept.

    Memory grows with patch volume and with batch, so the search is plain bisection. Where both
    caps are given and the largest patch at the largest batch fits without checkpointing, nothing
    can do more work at a cheaper step: that one estimate settles it. Otherwise, per mode, the
    largest patch that fits at batch 2 is found by bisection, and then the largest batch at that
    patch (doubling, then bisection). Smaller patches, each with its largest batch, are candidates
    only down to the volume at which the batch would grow by two, B / (B + 2) of it, and never
    below half: context matters more than batch in segmentation, and the trade is only there to
    take up the memory that the coarse steps between patches (and the rounding of the batch) leave
    unused. A smaller patch is estimated only where it could come within the tie margin of the
    best so far. Among the candidates the most work wins, but all within 5 % of the most count as
    equal, and of those the cheapest mode, then the largest patch, then the largest batch is
    chosen. Finally single axes of the chosen patch grow by half the divisor while it still fits
    (`_grown_axes`), to take up what the steps between scaled patches leave.

    Returns the config (`train.batch_size`, `train.patch_size` and `model.checkpointing` set; the
    rest as given) and the run's report. Raises MedsegError, with the numbers, if nothing fits.
    """
    from medseg.models import network_plan

    if max_batch is not None and max_batch < 1:
        raise ConfigError(f"max_batch must be at least 1, got {max_batch}")
    if max_patch is not None and (len(max_patch) != 3 or min(max_patch) < 1):
        raise ConfigError(f"max_patch must be three positive integers, got {list(max_patch)}")
    modes = _modes(step_time)
    base = [int(n) for n in cfg.train.patch_size]
    unit = network_plan(cfg, spacing).divisor
    patches = [p for p in _scaled_patches(base, unit, _MAX_SCALE, max_patch) if _buildable(cfg, p, spacing)]
    if not patches:
        raise MedsegError(f"no patch of the shape of {base} builds a network (divisor {list(unit)})")
    _check_budget(budget_bytes, overhead)
    estimates = _Estimates(cfg, in_channels, num_classes, spacing, budget_bytes, overhead, data)
    cap = max_batch if max_batch is not None else _NO_BATCH_CAP

    if max_patch is not None and max_batch is not None and estimates.fits(patches[-1], cap, modes[0]):
        mode, patch, batch = modes[0], patches[-1], cap
    else:
        candidates = _candidates(estimates, patches, modes, cap, step_time)
        if not candidates:
            raise MedsegError(_nothing_fits(budget_bytes, overhead, estimates.smallest()))
        best = max(c.work for c in candidates)
        equal = [c for c in candidates if c.work >= best * (1 - _TIE)]
        _, mode, patch, batch = min(equal, key=lambda c: (step_time[c.mode], -math.prod(c.patch), -c.batch))
    patch = _grown_axes(estimates, patch, batch, mode, unit, max_patch)
    report = estimates.report(patch, batch, mode)
    assert report is not None  # every patch `_grown_axes` returns was estimated to fit
    return _candidate(cfg, patch, batch, mode), report


def _candidates(estimates: _Estimates, patches: list[list[int]], modes: Sequence[str], cap: int,
                step_time: Mapping[str, float]) -> list[_Candidate]:
    """`fit`'s candidates: per mode the largest patch at the smallest batch with its largest batch,
    then the smaller patches worth trading for batch; none if nothing fits at batch 1."""
    smallest = min(2, cap)
    tops = _largest_patches(estimates, patches, smallest, modes)
    if smallest == 2 and not tops:
        smallest = cap = 1
        tops = _largest_patches(estimates, patches, 1, modes)
    candidates: list[_Candidate] = []

    def add(mode: str, patch: Sequence[int], batch: int) -> _Candidate | None:
        # `batch` fits at `patch`; search above the batch that comes within the tie of the best so far.
        volume = math.prod(patch)
        best = max((c.work for c in candidates), default=0.0)
        needed = max(batch, math.ceil(best * (1 - _TIE) * step_time[mode] / volume))
        if needed > cap or (needed > batch and not estimates.fits(patch, needed, mode)):
            return None
        batch = _largest_batch(lambda b: estimates.fits(patch, b, mode), needed, cap)
        candidates.append(_Candidate(volume * batch / step_time[mode], mode, tuple(patch), batch))
        return candidates[-1]

    top_batch = {}
    for mode, index in tops.items():  # the largest patches first: they set the work to beat
        top = add(mode, patches[index], smallest)
        top_batch[mode] = top.batch if top is not None else smallest
    for mode, index in tops.items():
        floor = math.prod(patches[index]) * max(_SHRINK, top_batch[mode] / (top_batch[mode] + 2))
        for smaller in reversed(patches[:index]):
            if math.prod(smaller) < floor:
                break
            add(mode, smaller, top_batch[mode])  # what fits at a patch fits at a smaller one
    return candidates


def _largest_patches(estimates: _Estimates, patches: list[list[int]], batch: int,
                     modes: Sequence[str]) -> dict[str, int]:
    """Per mode, the index of the largest of `patches` (ascending in volume) that fits at `batch`,
    by bisection; modes where none fits left out. Each mode's search starts with the previous
    mode's answer, which usually fits as well: the modes come cheapest in time first, so
    each needs less memory than the one before."""
    tops: dict[str, int] = {}
    previous = -1
    for mode in modes:
        def fits(index: int) -> bool:
            return estimates.fits(patches[index], batch, mode)

        good = previous if previous >= 0 and fits(previous) else -1
        index = _last_fitting(fits, good, len(patches))
        if index >= 0:
            tops[mode] = previous = index
    return tops


def _largest_batch(fits: Callable[[int], bool], good: int, cap: int) -> int:
    """The largest batch up to `cap` that fits, given that `good` does: doubling until one does
    not fit (or the cap), then bisection."""
    while good < cap:
        probe = min(2 * good, cap)
        if not fits(probe):
            return _last_fitting(fits, good, probe)
        good = probe
    return good


def _last_fitting(fits: Callable[[int], bool], good: int, bad: int) -> int:
    """Bisection: the largest x with good <= x < bad and `fits(x)`, for `fits` true up to some x and
    false above it, where `good` fits (or is the start of the range less one) and `bad` does not
    (or is the end of the range plus one)."""
    while bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good


def fit_to_data(cfg: Config, prep: Any, summaries: Sequence[Any],
                validation_summaries: Sequence[Any] | None = None) -> tuple[Config, RunReport]:
    """The configuration `medseg train` runs for `train.memory_budget`, and the run's report.

    `fit` within the budget, the whole run counted (`run_data` of the training cases `summaries`
    and the validation cases `validation_summaries`, checked `CaseSummary`s; None: the training
    cases stand in for them), the patch grown no further than the training data's extent and the
    batch no further than nnU-Net's cap (`medseg.data.fingerprint.growth_limits`), for the network
    `prep` (a `Preprocessing`) describes. `medseg memory --gpu-memory` calls this too, so it prints
    what `train` then runs.
    """
    from medseg.data.fingerprint import growth_limits

    budget = parse_size(cfg.train.memory_budget)
    max_patch, max_batch = growth_limits(summaries, prep.spacing)
    data = _data(cfg, prep, summaries, validation_summaries)
    return fit(cfg, prep.channels, prep.num_classes, prep.spacing, budget, data=data,
               max_patch=max_patch, max_batch=max(max_batch, cfg.train.batch_size))


def overview(cfg: Config, prep: Any, summaries: Sequence[Any],
             validation_summaries: Sequence[Any] | None = None) -> dict[str, Any]:
    """What `medseg memory` shows.

    `rows`: the predicted step peak for AMP {off, the configured mode} × every checkpointing mode
    at the configured patch and batch, each with `run_total` (the whole run's peak) and, with
    `train.memory_budget` set, whether the run `fits` it. `run`: the parts of the configured run
    (`RunReport.to_dict`; without a budget, as if every volume were resident and with the overhead's
    constant alone). With a budget, `fit`: the configuration `medseg train` runs (`fit_to_data`'s
    report, or `{"error": ...}` when nothing fits). `prep` and the summaries as for `fit_to_data`.
    """
    from medseg.models import CHECKPOINTING_MODES

    budget = parse_size(cfg.train.memory_budget) if cfg.train.memory_budget else None
    data = _data(cfg, prep, summaries, validation_summaries)
    amp = "fp16" if cfg.train.amp in ("auto", "fp16") else cfg.train.amp
    patch, batch = cfg.train.patch_size, cfg.train.batch_size
    rows, run = [], None
    for amp_mode in dict.fromkeys(("off", amp)):
        candidate = cfg.replace(train={"amp": amp_mode})
        estimates = _Estimates(candidate, prep.channels, prep.num_classes, prep.spacing, budget, OVERHEAD, data)
        for mode in CHECKPOINTING_MODES:
            report = estimates.report(patch, batch, mode)
            if report is None:
                raise ConfigError(f"'model.checkpointing': {mode!r} cannot be built for this config")
            fits = None if budget is None else report.total <= budget
            rows.append({**report.step.to_dict(), "run_total": report.total, "fits": fits})
            if amp_mode == amp and mode == cfg.model.checkpointing:
                run = report.to_dict()
    result: dict[str, Any] = {"rows": rows, "budget": budget, "run": run,
                              "overhead": {"fraction": OVERHEAD.fraction, "constant": OVERHEAD.constant}}
    if budget is not None:
        try:
            result["fit"] = fit_to_data(cfg, prep, summaries, validation_summaries)[1].to_dict()
        except MedsegError as exc:
            result["fit"] = {"error": str(exc)}
    return result


def _data(cfg: Config, prep: Any, summaries: Sequence[Any], validation_summaries: Sequence[Any] | None) -> RunData:
    validation = summaries if validation_summaries is None else validation_summaries
    return run_data(summaries, validation if cfg.validate.every > 0 else (), prep.spacing, prep.channels)


def _modes(step_time: Mapping[str, float]) -> list[str]:
    """The checkpointing modes `fit` chooses from, cheapest step first."""
    from medseg.models import CHECKPOINTING_MODES

    modes = sorted((m for m in CHECKPOINTING_MODES if m in step_time), key=lambda m: step_time[m])
    if not modes:
        raise MedsegError(f"no checkpointing mode of {CHECKPOINTING_MODES} has a step time in {dict(step_time)}")
    return modes


def _check_budget(budget_bytes: int, overhead: Overhead) -> None:
    if budget_bytes <= 0:
        raise ConfigError(f"memory budget must be positive, got {budget_bytes} bytes")
    if not 0 <= overhead.fraction < 1 or overhead.constant < 0:
        raise ConfigError(f"memory overhead must be a fraction in [0, 1) and a constant of at least 0 bytes, "
                          f"got {overhead}")


def _candidate(cfg: Config, patch: Sequence[int], batch: int, mode: str) -> Config:
    return cfg.replace(train={"patch_size": [int(n) for n in patch], "batch_size": batch},
                       model={"checkpointing": mode})


def _buildable(cfg: Config, patch: Sequence[int], spacing: Sequence[float]) -> bool:
    # Whether the network geometry exists for this patch (a fixed model.depth needs a large enough
    # patch); geometry only, no estimate.
    from medseg.models import network_plan

    try:
        network_plan(cfg.replace(train={"patch_size": [int(n) for n in patch]}), spacing)
    except ConfigError:
        return False
    return True


def _grown_axes(estimates: _Estimates, patch: Sequence[int], batch: int, mode: str, unit: Sequence[int],
                max_patch: Sequence[int] | None) -> list[int]:
    """Take up what the coarse steps of the scaled patches leave unused: grow single axes of the
    chosen patch, the shortest first, by half the divisor (the network then downsamples that
    axis one time fewer), as long as the step still fits; batch and checkpointing stay."""
    patch = [int(n) for n in patch]
    grown = True
    while grown:
        grown = False
        for axis in sorted(range(3), key=lambda a: (patch[a], a)):
            step = unit[axis] // 2
            larger = list(patch)
            larger[axis] += step
            if step < 8 or (max_patch is not None and larger[axis] > max_patch[axis]):
                continue
            if _buildable(estimates.cfg, larger, estimates.spacing) and estimates.fits(larger, batch, mode):
                patch, grown = larger, True
                break
    return patch


def _scaled_patches(base: list[int], unit: Sequence[int], max_scale: float,
                    max_patch: Sequence[int] | None) -> list[list[int]]:
    """Distinct patches of `base`'s shape scaled by one factor, each axis a multiple of `unit`
    (and at least one unit), ascending in volume, up to `max_scale` times `base` and `max_patch`."""
    cap = [int(b * max_scale) for b in base]
    if max_patch is not None:
        cap = [max(min(c, int(m) // u * u), u) for c, m, u in zip(cap, max_patch, unit)]
    patches: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    # Factors at which some axis reaches its next multiple of its unit.
    factors = sorted({k * u / b for b, u, c in zip(base, unit, cap) for k in range(1, c // u + 1)})
    for factor in factors:
        patch = [min(max(u, int(b * factor + 1e-9) // u * u), c) for b, u, c in zip(base, unit, cap)]
        key = tuple(patch)
        if key not in seen:
            seen.add(key)
            patches.append(patch)
    patches.sort(key=lambda p: (math.prod(p), p))
    return patches


def _nothing_fits(budget_bytes: int, overhead: Overhead, smallest: RunReport | None) -> str:
    text = (f"nothing fits in {budget_bytes / GiB:.2f} GiB (of which {overhead.bytes(budget_bytes) / GiB:.2f} GiB "
            f"are kept free for overhead)")
    if smallest is not None:
        patch = "×".join(str(n) for n in smallest.patch_size)
        text += (f"; the smallest configuration tried (patch {patch}, batch {smallest.batch_size}, "
                 f"checkpointing {smallest.checkpointing}, amp {smallest.amp}) needs {smallest.total / GiB:.2f} GiB "
                 f"for the run (step {smallest.step.total / GiB:.2f}, resident volumes "
                 f"{smallest.resident_volumes / GiB:.2f}, validation {smallest.validation / GiB:.2f})")
    return text
