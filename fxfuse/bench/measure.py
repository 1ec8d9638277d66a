"""Paired timing: the speedup of `optimized` over `baseline` as a ratio measured back to back.

Absolute seconds on a shared 2-core machine drift by tens of percent between minutes; the ratio of two
timings taken within the same few milliseconds does not, because both sides see the same load. So each
pair runs baseline and optimized back to back (the order alternates, so neither side always runs on a
cache warmed by the other), and the result is the median over pairs, with quartiles and extremes as the
measure of noise.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


@dataclass(frozen=True)
class TimingConfig:
    """How hard to measure. `sample_s` is the least time one timed sample (inner loop) may take.

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


def calibrate(fn: Callable[[], object], sample_s: float, max_inner: int) -> int:
    """Calls per sample so that one sample of `fn` lasts at least `sample_s` of wall time (timer
    resolution, jitter)."""
    inner = 1
    while inner < max_inner:
        t = _time(fn, inner) * inner
        if t >= sample_s:
            break
        # Aim a bit past the target so the next attempt usually succeeds.
        inner = min(max_inner, max(inner * 2, int(inner * 1.2 * sample_s / max(t, 1e-9)) + 1))
    return inner


def paired_ratio(
    baseline: Callable[[], object],
    optimized: Callable[[], object],
    config: TimingConfig = FULL,
) -> Measurement:
    """Median of per-pair ratios baseline_time / optimized_time after warm-up of both sides."""
    for _ in range(config.warmup):
        baseline()
        optimized()
    # Both sides use the same call count; it is sized on the slower side so neither sample is too short.
    inner = min(
        calibrate(baseline, config.sample_s, config.max_inner),
        calibrate(optimized, config.sample_s, config.max_inner),
    )
    clock = CLOCKS[config.clock]
    ratios, base_times, opt_times = [], [], []
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()  # a collection landing in one side of a pair would skew that pair only
    try:
        for i in range(config.pairs):
            if i % 2 == 0:
                tb = _time(baseline, inner, clock)
                to = _time(optimized, inner, clock)
            else:
                to = _time(optimized, inner, clock)
                tb = _time(baseline, inner, clock)
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
        inner=inner,
        baseline_s=statistics.median(base_times),
        optimized_s=statistics.median(opt_times),
        ratios=ratios,
    )
