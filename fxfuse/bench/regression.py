"""Speedup-regression check: each measured ratio against the committed baseline.

The baseline file records, per case, the ratio we accept (not the best ever seen): `write_baseline`
takes the lower quartile of the pair ratios of a run (at most 90% of its median), the lowest over the
runs that wrote the file, so ordinary noise sits above it; the check fails only when a run's median
falls below baseline x (1 - tolerance).

Baseline format (benchmarks/baselines/cpu.json):
    {"suite": "cpu", "how": "...", "source": {...}, "cases": {"op/attention[...]": {"ratio": 3.1, "last_run": {...}}}}
A results file written by `fxfuse bench --json` is accepted as a baseline too (its medians are used).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_TOLERANCE = 0.15
# Cap of the accepted ratio relative to a run's median: the medians of one case drift by about +-10%
# from run to run on a shared machine, more than the within-run IQR of the steadiest cases.
MEDIAN_CAP = 0.9
BASELINE_RULE = (
    f"ratio = min(q1, {MEDIAN_CAP} x median) of the paired ratios, the lowest over the runs that wrote this "
    "file (--write-baseline keeps the lower of the old and new value), so that ordinary noise sits above "
    "it; the check fails when a run's median falls below ratio x (1 - tolerance). last_run: the latest run."
)


@dataclass
class CheckResult:
    failures: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def lines(self) -> list[str]:
        out = [f"REGRESSION {msg}" for msg in self.failures]
        out += [f"new case (not in baseline, not checked): {name}" for name in self.new]
        out += [f"warning: baseline case not run: {name}" for name in self.missing]
        verdict = "FAILED" if self.failures else "passed"
        out.append(
            f"speedup check {verdict}: {len(self.passed)} ok, {len(self.failures)} regressed, "
            f"{len(self.new)} new, {len(self.missing)} missing"
        )
        return out


def load_baseline(path: str | Path) -> dict[str, float]:
    """name -> accepted ratio, from a baseline file or a results file."""
    data = json.loads(Path(path).read_text())
    cases = data.get("cases", data)
    if isinstance(cases, list):  # a results file
        return {c["name"]: float(c["ratio"]) for c in cases if "ratio" in c}
    return {name: float(v["ratio"] if isinstance(v, dict) else v) for name, v in cases.items()}


def check(measured: dict[str, float], baseline: dict[str, float], tolerance: float = DEFAULT_TOLERANCE) -> CheckResult:
    """Compare measured median ratios (name -> ratio) with the baseline's accepted ratios."""
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance={tolerance}: expected a fraction in [0, 1), e.g. 0.15")
    result = CheckResult()
    for name, ratio in measured.items():
        if name not in baseline:
            result.new.append(name)
            continue
        floor = baseline[name] * (1.0 - tolerance)
        if ratio < floor:
            result.failures.append(
                f"{name}: speedup {ratio:.2f}x < {floor:.2f}x (baseline {baseline[name]:.2f}x - "
                f"{tolerance:.0%}), {1 - ratio / baseline[name]:.0%} below baseline"
            )
        else:
            result.passed.append(name)
    result.missing = [name for name in baseline if name not in measured]
    return result


def write_baseline(results: dict, path: str | Path, *, previous: str | Path | None = None) -> dict:
    """Write the accepted ratio per case, min(q1, MEDIAN_CAP x median), from a results dict (cli.run_suite).

    With `previous`, a case keeps the lower of its old and new value: a baseline refreshed over several
    runs (on a machine whose load varies) then holds the ratio every one of those runs met.
    """
    old = load_baseline(previous) if previous and Path(previous).exists() else {}
    cases = {}
    for c in results["cases"]:
        accepted = min(c["q1"], MEDIAN_CAP * c["ratio"], old.get(c["name"], float("inf")))
        last_run = {"median": round(c["ratio"], 3), "q1": round(c["q1"], 3), "q3": round(c["q3"], 3)}
        cases[c["name"]] = {"ratio": round(accepted, 3), "last_run": {**last_run, "pairs": c["pairs"]}}
    data = {
        "suite": results["suite"],
        "quick": results["quick"],
        "how": BASELINE_RULE,
        "source": {"date": results["date"], "machine": results["machine"], "versions": results["versions"]},
        "cases": cases,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
    return data
