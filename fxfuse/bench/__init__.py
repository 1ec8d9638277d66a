"""Benchmarks: paired speedup measurements, the case registry, the CI regression check and the GPU suite.

`python -m fxfuse.bench --quick --baseline benchmarks/baselines/cpu.json` is what `make test` runs.
"""

from fxfuse.bench.measure import Measurement, TimingConfig, paired_ratio
from fxfuse.bench.registry import REGISTRY, Case, Registry, SkipCase, case, family
from fxfuse.bench.regression import check, load_baseline, write_baseline

__all__ = [
    "REGISTRY",
    "Case",
    "Measurement",
    "Registry",
    "SkipCase",
    "TimingConfig",
    "case",
    "check",
    "family",
    "load_baseline",
    "paired_ratio",
    "write_baseline",
]
