"""Paired timing: the speedup of `optimized` over `baseline` as a ratio measured back to back.

Absolute seconds on a shared 2-core machine drift by tens of percent between minutes; the ratio of two
timings taken within the same few milliseconds does not, because both sides see the same load. So each
pair runs baseline and optimized back to back (the order alternates, so neither side always runs on a
cache warmed by the other), and the result is the median over pairs, with quartiles and extremes as the
measure of noise. Three more things keep other jobs out of the numbers: process CPU time (`clock="cpu"`,
time spent descheduled does not count), each side's sample is its fastest unit of calls
(`fastest_unit`: interference only adds time), and freed memory stays in the process while timing
(`steady_allocator`: no page faults inside a sample).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import gc
import math
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


@dataclass(frozen=True)
class TimingConfig:
    """How hard to measure. `sample_s` is about the time one side's sample takes (its units of calls).

    clock "wall" (the default) is latency. "cpu" (process CPU time) counts only the time this process
    ran: with one torch thread (and only then: CPU time adds threads up), time spent descheduled while
    other jobs share the cores does not land in either side of a pair. `fxfuse bench` uses it that way.
    """

    pairs: int = 15
    warmup: int = 3
    sample_s: float = 0.03
    max_inner: int = 10_000
    clock: str = "wall"

    def __post_init__(self) -> None:
        if self.clock not in CLOCKS:
            raise ValueError(f"clock={self.clock!r}: expected one of {', '.join(CLOCKS)}")
        if self.pairs < 5:
            raise ValueError(f"pairs={self.pairs}: a median needs at least 5 pairs to mean anything")
        if self.warmup < 1 or self.sample_s <= 0 or self.max_inner < 1:
            raise ValueError("warmup and max_inner must be >= 1 and sample_s > 0")


QUICK = TimingConfig(pairs=15, warmup=2, sample_s=0.02)
FULL = TimingConfig(pairs=21, warmup=3, sample_s=0.05)


@dataclass
class Measurement:
    """Ratios are baseline time / optimized time: above 1.0 the optimized side is faster."""

    ratio: float
    q1: float
    q3: float
    min: float
    max: float
    pairs: int
    inner: int
    baseline_s: float
    optimized_s: float
    ratios: list[float] = field(default_factory=list)
    baseline_inner: int = 1  # calls per sample on the baseline side (`inner`: on the optimized side)

    @property
    def iqr_rel(self) -> float:
        """Interquartile range relative to the median: the noise a regression tolerance must absorb."""
        return (self.q3 - self.q1) / self.ratio if self.ratio else float("inf")

    def scaled(self, factor: float) -> Measurement:
        """The same measurement with the optimized side `factor` times slower (tests inject regressions)."""
        return Measurement(
            ratio=self.ratio / factor,
            q1=self.q1 / factor,
            q3=self.q3 / factor,
            min=self.min / factor,
            max=self.max / factor,
            pairs=self.pairs,
            inner=self.inner,
            baseline_s=self.baseline_s,
            optimized_s=self.optimized_s * factor,
            ratios=[r / factor for r in self.ratios],
            baseline_inner=self.baseline_inner,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3); inclusive method so that 5 values give sensible quartiles."""
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def _time(fn: Callable[[], object], inner: int, clock: Callable[[], float] = time.perf_counter) -> float:
    start = clock()
    for _ in range(inner):
        fn()
    return (clock() - start) / inner


def calibrate(
    fn: Callable[[], object], sample_s: float, max_inner: int, clock: Callable[[], float] = time.perf_counter
) -> int:
    """Calls per sample so that one sample of `fn` lasts at least `sample_s` on `clock` (timer
    resolution, jitter)."""
    inner = 1
    while inner < max_inner:
        t = _time(fn, inner, clock) * inner
        if t >= sample_s:
            break
        # Aim a bit past the target so the next attempt usually succeeds.
        inner = min(max_inner, max(inner * 2, int(inner * 1.2 * sample_s / max(t, 1e-9)) + 1))
    return inner


# The shortest stretch timed as one unit: clock reads and loop overhead stay below 0.1% of it.
MIN_TIMED_S = 1e-3


# The faster side of a pair gets tries for at least this share of the slower side's unit: interference
# hits a short, memory-bound fused op hardest, and its extra tries cost little next to the eager side.
FAST_SIDE_SHARE = 0.25


@dataclass(frozen=True)
class SamplePlan:
    """One side's sample: `units` timed units of `group` calls each (`unit_s` each, as calibrated);
    the sample is the fastest unit."""

    units: int
    group: int
    unit_s: float

    @property
    def calls(self) -> int:
        return self.units * self.group

    def covering(self, seconds: float, max_inner: int) -> SamplePlan:
        """This plan with enough units to last about `seconds` (never fewer units, at most max_inner calls)."""
        units = max(self.units, min(max_inner // self.group, math.ceil(seconds / max(self.unit_s, 1e-9))))
        return dataclasses.replace(self, units=units)


def plan_sample(
    fn: Callable[[], object], sample_s: float, max_inner: int, clock: Callable[[], float] = time.perf_counter
) -> SamplePlan:
    """Units of >= MIN_TIMED_S, as many as fit in `sample_s` (at least one), at most `max_inner` calls."""
    group = calibrate(fn, MIN_TIMED_S, max_inner, clock)
    unit_s = _time(fn, group, clock) * group
    return SamplePlan(1, group, unit_s).covering(sample_s, max_inner)


# Sides whose calls take within this factor of each other get one plan: the fastest of more tries is
# faster, so unequal numbers of tries (calibrated on a noisy clock) would tilt a ratio near 1.0 either way.
COMPARABLE = 1.5


def plan_pair(
    baseline: Callable[[], object],
    optimized: Callable[[], object],
    sample_s: float,
    max_inner: int,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[SamplePlan, SamplePlan]:
    """Sample plans of both sides: one shared plan when their calls take about as long (a model with
    nothing to fuse), else each side's own, the faster side's covering FAST_SIDE_SHARE of the slower
    side's unit (a 7 ms fused op gets ~11 tries next to a 300 ms eager one)."""
    base = plan_sample(baseline, sample_s, max_inner, clock)
    opt = plan_sample(optimized, sample_s, max_inner, clock)
    call_s = sorted((base.unit_s / base.group, opt.unit_s / opt.group))
    if call_s[1] <= COMPARABLE * call_s[0]:
        group = max(base.group, opt.group)
        shared = SamplePlan(1, group, group * call_s[1]).covering(sample_s, max_inner)
        return shared, shared
    base_share, opt_share = FAST_SIDE_SHARE * opt.unit_s, FAST_SIDE_SHARE * base.unit_s
    return base.covering(base_share, max_inner), opt.covering(opt_share, max_inner)


def fastest_unit(fn: Callable[[], object], plan: SamplePlan, clock: Callable[[], float]) -> float:
    """Seconds per call of the fastest of the plan's units.

    Interference from other jobs (a neighbour evicting the cache, taking memory bandwidth) only ever
    adds time, and it hits a memory-bound fused op much harder than the compute-bound code it replaces:
    measured on `op/spp[sppf-chain,8x256x20x20]`, the eager side's per-call CPU time stayed within +-8% while the
    fused side's swung 10-19 ms. The fastest unit of a sample is the call that ran undisturbed.
    """
    return min(_time(fn, plan.group, clock) for _ in range(plan.units))


# glibc mallopt parameters (malloc.h) and their documented defaults.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


@contextlib.contextmanager
def steady_allocator() -> Iterator[bool]:
    """Keep freed memory in the process while timing (glibc only; yields whether it applied).

    With glibc's defaults a buffer above a few MB is mmap'ed per allocation and unmapped when freed, so
    an eager op chain with [B, H, N, N] temporaries page-faults its buffers in again on every call:
    measured 0-16k faults per call of `model/AttentionHeavy`'s original, the kernel time of which made
    its CPU time swing 48-95 ms and its pair ratios 1.3-7.9x. With mmap off and the heap never trimmed,
    the same calls reuse warm pages (36-45 ms, 0 faults): a sample then times the computation, which
    is what a fused op changes, and not how busy the host is zeroing pages.
    """
    libc = None
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        with contextlib.suppress(OSError):
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if libc is None:
        yield False
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    try:
        yield True
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)


def paired_ratio(
    baseline: Callable[[], object],
    optimized: Callable[[], object],
    config: TimingConfig = FULL,
) -> Measurement:
    """Median of per-pair ratios baseline_time / optimized_time after warm-up of both sides.

    Each side's sample is its fastest unit (`fastest_unit`) over about `config.sample_s` (`plan_pair`).
    """
    with steady_allocator():
        for _ in range(config.warmup):
            baseline()
            optimized()
        max_inner, clock = config.max_inner, CLOCKS[config.clock]
        base_plan, opt_plan = plan_pair(baseline, optimized, config.sample_s, max_inner, clock)
        ratios, base_times, opt_times = [], [], []
        gc_was_enabled = gc.isenabled()
        gc.collect()
        gc.disable()  # a collection landing in one side of a pair would skew that pair only
        try:
            for i in range(config.pairs):
                if i % 2 == 0:
                    tb = fastest_unit(baseline, base_plan, clock)
                    to = fastest_unit(optimized, opt_plan, clock)
                else:
                    to = fastest_unit(optimized, opt_plan, clock)
                    tb = fastest_unit(baseline, base_plan, clock)
                base_times.append(tb)
                opt_times.append(to)
                ratios.append(tb / max(to, 1e-12))
        finally:
            if gc_was_enabled:
                gc.enable()
    q1, med, q3 = quartiles(ratios)
    return Measurement(
        ratio=med,
        q1=q1,
        q3=q3,
        min=min(ratios),
        max=max(ratios),
        pairs=config.pairs,
        inner=opt_plan.calls,
        baseline_s=statistics.median(base_times),
        optimized_s=statistics.median(opt_times),
        ratios=ratios,
        baseline_inner=base_plan.calls,
    )
