"""Speedup-regression check: each case's median ratio against the median the baseline recorded for it.

The rule (what `fxfuse bench --quick --baseline benchmarks/baselines/cpu.json`, run by `make test`,
enforces):

- The baseline records, per case, the median of the paired ratios of one run, with its quartiles, the
  number of pairs and the date. `--write-baseline` records this run's values as they are: never the
  lower of an old and a new value, never a quartile, so the bar does not ratchet down.
- A case fails when its median falls below (1 - tolerance) x its baseline median, tolerance 0.2: a
  fused side 25% slower (median 0.75 x baseline) fails, a 10% wobble passes.
- A case with a floor fails below that absolute ratio whatever the baseline says: the models with
  nothing to fuse must come back from `optimize` no slower than 0.95x.
- A case that fails either way is measured once more with three times the pairs before it counts, and
  the median of both measurements' pairs pooled decides (a burst of load from another job in the first
  is outvoted by the second, a real regression is in both).
- A case that cannot run (any exception, ImportError and SkipCase included) fails with its error, a
  baseline case that did not run fails, and a case missing from the baseline fails: an unchecked case
  guards nothing. Record a new case with `fxfuse bench --quick --cases NAME --write-baseline FILE`
  (updates that entry, keeps the others).

Baseline format (benchmarks/baselines/cpu.json):
    {"suite": "cpu", "quick": true, "how": "...", "source": {"date", "machine", "versions"},
     "cases": {"op/spp[sppf-chain,1x256x20x20]": {"median": 21.8, "q1": 20.3, "q3": 22.7,
                                                  "iqr_rel": 0.11, "pairs": 45, "date": "...",
                                                  "round_medians": [21.5, 22.2, 21.8]}}}
A results file written by `fxfuse bench --json` is accepted as a baseline too (its medians are used).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_TOLERANCE = 0.2
# Models with nothing to fuse: `optimize` hands them back, at most this much slower.
NO_PATTERN_FLOOR = 0.95
# Pairs of the second measurement of a failing case, as a multiple of the first one's.
RECHECK_PAIRS_FACTOR = 3
BASELINE_RULE = (
    "median: the median paired ratio of the run that wrote the entry (q1, q3: its quartiles), recorded as "
    "measured (never lowered to an older value). A case fails when its median is below (1 - tolerance) x "
    f"this median (tolerance {DEFAULT_TOLERANCE}), or below its absolute floor (models with nothing to fuse: "
    f"{NO_PATTERN_FLOOR}x), confirmed by a second measurement with {RECHECK_PAIRS_FACTOR}x the pairs (the "
    "pairs of both pooled); a case that errors, a baseline case not run and a case not in the baseline fail too."
)


@dataclass
class CheckResult:
    """`failures`: one message per failing case; `regressed`: the cases whose ratio failed (worth a
    second measurement, unlike errors or missing cases)."""

    failures: list[str] = field(default_factory=list)
    regressed: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def lines(self) -> list[str]:
        verdict = "FAILED" if self.failures else "passed"
        return [*self.failures, f"speedup check {verdict}: {len(self.passed)} ok, {len(self.failures)} failed"]


def load_baseline(path: str | Path) -> dict[str, float]:
    """name -> recorded median ratio, from a baseline file or a results file."""
    data = json.loads(Path(path).read_text())
    cases = data.get("cases", data)
    if isinstance(cases, list):  # a results file
        return {c["name"]: float(c["ratio"]) for c in cases if "ratio" in c}
    out = {}
    for name, entry in cases.items():
        if not isinstance(entry, dict) or "median" not in entry:
            raise ValueError(
                f"{path}: case {name!r} has no recorded median (a file of an older format?); "
                "rewrite it with `fxfuse bench --quick --write-baseline FILE`"
            )
        out[name] = float(entry["median"])
    return out


def check(
    measured: dict[str, float],
    baseline: dict[str, float],
    tolerance: float = DEFAULT_TOLERANCE,
    *,
    floors: dict[str, float] | None = None,
    errors: dict[str, str] | None = None,
) -> CheckResult:
    """Judge measured median ratios (name -> ratio) against the baseline's medians.

    `floors`: absolute minimum ratios (name -> ratio), checked whatever the baseline says. `errors`:
    cases that could not run (name -> reason). Every name in `baseline` must be measured or errored.
    """
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance={tolerance}: expected a fraction in [0, 1), e.g. {DEFAULT_TOLERANCE}")
    floors, errors = floors or {}, errors or {}
    result = CheckResult()
    for name, reason in errors.items():
        result.failures.append(f"ERROR {name}: could not run: {reason}")
    for name, ratio in measured.items():
        failed = []
        if name in floors and ratio < floors[name]:
            failed.append(
                f"SLOWER {name}: speedup {ratio:.3f}x < floor {floors[name]:.2f}x (nothing to fuse here: "
                "optimize must not make it slower)"
            )
        if name not in baseline:
            result.failures.append(
                f"NEW {name}: not in the baseline, so not checked; record it on a quiet machine with "
                f"`fxfuse bench --quick --cases '{name}' --write-baseline FILE`"
            )
        elif ratio < baseline[name] * (1.0 - tolerance):
            failed.append(
                f"REGRESSION {name}: speedup {ratio:.2f}x < {(1 - tolerance):.2f} x baseline median "
                f"{baseline[name]:.2f}x ({1 - ratio / baseline[name]:.0%} below it)"
            )
        if failed:
            result.failures += failed
            result.regressed.append(name)
        elif name in baseline:
            result.passed.append(name)
    for name in baseline:
        if name not in measured and name not in errors:
            result.failures.append(f"MISSING {name}: in the baseline but not run")
    return result


def write_baseline(results: dict, path: str | Path, *, previous: str | Path | None = None) -> dict:
    """Write this run's median ratio (and quartiles) per case from a results dict (cli.run_suite).

    With `previous` (an existing baseline file), the cases this run did not measure keep their entries;
    the ones it measured are replaced, up or down.
    """
    if results.get("errors"):
        names = ", ".join(e["name"] for e in results["errors"])
        raise ValueError(f"not writing a baseline from a run in which cases failed to run: {names}")
    cases = {}
    if previous and Path(previous).exists():
        old = json.loads(Path(previous).read_text())
        load_baseline(previous)  # refuses a file of the old format instead of merging into it
        cases.update(old.get("cases", {}))
    for c in results["cases"]:
        cases[c["name"]] = {
            "median": round(c["ratio"], 3),
            "q1": round(c["q1"], 3),
            "q3": round(c["q3"], 3),
            "iqr_rel": round(c["iqr_rel"], 3),
            "pairs": c["pairs"],
            "date": results["date"],
        }
        if "round_medians" in c:
            cases[c["name"]]["round_medians"] = [round(r, 3) for r in c["round_medians"]]
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
