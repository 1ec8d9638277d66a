"""`fxfuse bench`: run a suite, print a table, optionally write JSON / a plot and check against a baseline.

Exit status: 0 when every selected case ran and, with --baseline, passed the check (fxfuse/bench/
regression.py states the rule); 1 when a case could not run, regressed, fell below its floor, is missing
from the baseline or from the run (each message names the case).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import TextIO

from fxfuse.bench.measure import FULL, QUICK, Measurement, TimingConfig, paired_ratio, quartiles
from fxfuse.bench.registry import REGISTRY, Case, Registry
from fxfuse.bench.regression import (
    DEFAULT_TOLERANCE,
    RECHECK_PAIRS_FACTOR,
    CheckResult,
    check,
    load_baseline,
    write_baseline,
)
from fxfuse.bench.table import format_table

# A compile that takes longer than this is reported instead of timed (the case stays valid without it).
COMPILE_LIMIT_S = 60.0


def machine_info() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def versions() -> dict:
    import torch

    import fxfuse

    def dist_version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": dist_version("triton"),
        "fxfuse": fxfuse.__version__,
    }


def case_record(name: str, group: str, m: Measurement, setup_s: float, floor: float | None = None) -> dict:
    return {
        "name": name,
        "group": group,
        "floor": floor,
        "ratio": m.ratio,
        "q1": m.q1,
        "q3": m.q3,
        "min": m.min,
        "max": m.max,
        "iqr_rel": m.iqr_rel,
        "pairs": m.pairs,
        "inner": m.inner,
        "baseline_inner": m.baseline_inner,
        "baseline_ms": m.baseline_s * 1e3,
        "optimized_ms": m.optimized_s * 1e3,
        "setup_s": setup_s,
        "ratios": m.ratios,
    }


def _measure_compiled(c: Case, base, opt, config: TimingConfig, log: TextIO) -> dict | str:
    """The fused side against torch.compile of the original; a reason string when that cannot run."""
    import torch

    t0 = time.perf_counter()
    try:
        compiled = torch.compile(base)
        compiled()
    except Exception as e:  # a torch.compile failure is torch's, not a reason to fail our suite
        return f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    compile_s = time.perf_counter() - t0
    if compile_s > COMPILE_LIMIT_S:
        return f"torch.compile took {compile_s:.0f} s (> {COMPILE_LIMIT_S:.0f} s); not timed"
    print(f"      compiled in {compile_s:.1f} s", file=log)
    return case_record(f"{c.name} vs compile", c.group, paired_ratio(compiled, opt, config), compile_s)


def measure_case(c: Case, config: TimingConfig, log: TextIO) -> tuple[dict, object, object] | str:
    """(record, baseline_fn, optimized_fn), or the error that kept the case from running."""
    t0 = time.perf_counter()
    try:
        base, opt = c.setup()
    except Exception as e:  # ImportError and SkipCase too: a case that does not run fails the suite
        print(f"      ERROR in setup: {type(e).__name__}: {e}", file=log)
        traceback.print_exc(file=log)
        return f"{type(e).__name__}: {e}"
    setup_s = time.perf_counter() - t0
    return case_record(c.name, c.group, paired_ratio(base, opt, config), setup_s, c.floor), base, opt


def run_suite(
    registry: Registry,
    suite: str = "cpu",
    *,
    quick: bool = False,
    contains: str | None = None,
    config: TimingConfig | None = None,
    log: TextIO | None = None,
) -> dict:
    """Measure every selected case; returns the results dict written by --json."""
    log = log or sys.stderr
    config = config or (QUICK if quick else FULL)
    start = time.perf_counter()
    results: dict = {
        "suite": suite,
        "quick": quick,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": versions(),
        "timing": {"pairs": config.pairs, "warmup": config.warmup, "sample_s": config.sample_s, "clock": config.clock},
        "cases": [],
        "skipped": [],  # only comparisons against torch.compile that torch could not make
        "errors": [],
        "notes": {},
    }
    selected = list(registry.select(suite, quick=quick, contains=contains))
    for i, c in enumerate(selected, 1):
        if isinstance(c, tuple):
            label, exc = c
            reason = f"cannot list its cases: {type(exc).__name__}: {exc}"
            results["errors"].append({"name": label, "reason": reason})
            print(f"[{i}/{len(selected)}] {label}: ERROR: {reason}", file=log)
            continue
        print(f"[{i}/{len(selected)}] {c.name} ...", file=log, flush=True)
        t0 = time.perf_counter()
        measured = measure_case(c, config, log)
        if isinstance(measured, str):
            results["errors"].append({"name": c.name, "reason": measured})
            continue
        record, base, opt = measured
        results["cases"].append(record)
        print(
            f"      {record['ratio']:.2f}x  (IQR {record['q1']:.2f}-{record['q3']:.2f}, "
            f"setup {record['setup_s']:.1f} s, total {time.perf_counter() - t0:.1f} s)",
            file=log,
            flush=True,
        )
        if c.note:
            results["notes"][c.name] = c.note
        if c.compile and not quick:
            compiled = _measure_compiled(c, base, opt, config, log)
            if isinstance(compiled, str):
                results["skipped"].append({"name": f"{c.name} vs compile", "reason": compiled})
                print(f"      vs compile skipped: {compiled}", file=log)
            else:
                results["cases"].append(compiled)
                print(f"      vs compile: {compiled['ratio']:.2f}x", file=log)
    results["wall_s"] = round(time.perf_counter() - start, 1)
    return results


def pooled_record(records: list[dict]) -> dict:
    """One case's records of several measurements as one: pair ratios pooled, median and quartiles over
    all of them, each measurement's own median kept in "round_medians"."""
    ratios = [x for c in records for x in c["ratios"]]
    q1, med, q3 = quartiles(ratios)
    return {
        **records[-1],
        "ratio": med,
        "q1": q1,
        "q3": q3,
        "min": min(ratios),
        "max": max(ratios),
        "iqr_rel": (q3 - q1) / med,
        "pairs": len(ratios),
        "baseline_ms": statistics.median(c["baseline_ms"] for c in records),
        "optimized_ms": statistics.median(c["optimized_ms"] for c in records),
        "setup_s": sum(c["setup_s"] for c in records),
        "ratios": ratios,
        "round_medians": [c["ratio"] for c in records],
    }


def pool_rounds(rounds: list[dict]) -> dict:
    """One results dict from several runs of the same selection, each case's pairs pooled."""
    pooled = {**rounds[0], "cases": [], "errors": [], "rounds": len(rounds)}
    pooled["wall_s"] = round(sum(r["wall_s"] for r in rounds), 1)
    for name in dict.fromkeys(c["name"] for r in rounds for c in r["cases"]):
        pooled["cases"].append(pooled_record([c for r in rounds for c in r["cases"] if c["name"] == name]))
    for r in rounds:
        pooled["errors"] += [e for e in r["errors"] if e not in pooled["errors"]]
    return pooled


def render_table(results: dict, baseline: dict[str, float] | None = None) -> str:
    """Plain-text table of results["cases"], with the baseline's median when one is given."""
    head = ("case", "speedup", "IQR", "min-max", "pairs x calls", "orig ms", "fxfuse ms")
    if baseline is not None:
        head += ("baseline",)
    rows = []
    for c in results["cases"]:
        row = (
            c["name"],
            f"{c['ratio']:.2f}x",
            f"{c['q1']:.2f}-{c['q3']:.2f}",
            f"{c['min']:.2f}-{c['max']:.2f}",
            f"{c['pairs']}x{c.get('baseline_inner', c['inner'])}/{c['inner']}",
            f"{c['baseline_ms']:.3f}",
            f"{c['optimized_ms']:.3f}",
        )
        if baseline is not None:
            row += (f"{baseline[c['name']]:.2f}x" if c["name"] in baseline else "new",)
        rows.append(row)
    lines = [format_table(head, rows)]
    for note in sorted(set(results.get("notes", {}).values())):
        names = ", ".join(n for n, v in results["notes"].items() if v == note)
        lines.append(f"note     {names}: {note}")
    lines += [f"skipped  {s['name']}: {s['reason']}" for s in results.get("skipped", [])]
    lines += [f"ERROR    {s['name']}: {s['reason']}" for s in results.get("errors", [])]
    return "\n".join(lines)


def read_baseline(path: str, *, suite: str, quick: bool, contains: str | None) -> dict[str, float]:
    """The baseline's medians of the cases this run selects; a ValueError when the file does not fit it."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict):
        if data.get("suite", suite) != suite:
            raise ValueError(f"baseline {path} is of the {data['suite']!r} suite, this run is {suite!r}")
        if data.get("quick", quick) != quick:
            kind = "a --quick run" if data["quick"] else "a full run"
            raise ValueError(f"baseline {path} was recorded by {kind}: compare it with runs of the same kind")
    medians = load_baseline(path)
    return {n: r for n, r in medians.items() if contains is None or contains in n}


def _check(results: dict, baseline: dict[str, float], tolerance: float) -> CheckResult:
    measured = {c["name"]: c["ratio"] for c in results["cases"]}
    floors = {c["name"]: c["floor"] for c in results["cases"] if c.get("floor") is not None}
    errors = {e["name"]: e["reason"] for e in results["errors"]}
    return check(measured, baseline, tolerance, floors=floors, errors=errors)


def gate(
    registry: Registry,
    results: dict,
    baseline: dict[str, float],
    tolerance: float,
    config: TimingConfig,
    log: TextIO | None = None,
) -> CheckResult:
    """Check `results` against `baseline`. A case whose ratio fails is measured once more with
    RECHECK_PAIRS_FACTOR times the pairs; its record becomes the pool of both measurements' pairs (a
    burst of load in the first is outvoted by the second; a real regression is in both)."""
    log = log or sys.stderr
    outcome = _check(results, baseline, tolerance)
    if not outcome.regressed:
        return outcome
    recheck = dataclasses.replace(config, pairs=config.pairs * RECHECK_PAIRS_FACTOR)
    listed = {c.name: c for c in registry.select(results["suite"], quick=results["quick"]) if isinstance(c, Case)}
    index = {c["name"]: i for i, c in enumerate(results["cases"])}
    for name in outcome.regressed:
        if name not in listed:  # "<case> vs compile" (full runs): judged on its one measurement
            continue
        first = results["cases"][index[name]]
        print(f"{name}: {first['ratio']:.2f}x fails the check; measuring again with {recheck.pairs} pairs", file=log)
        measured = measure_case(listed[name], recheck, log)
        if isinstance(measured, str):
            results["errors"].append({"name": name, "reason": f"second measurement: {measured}"})
            continue
        second = measured[0]
        record = results["cases"][index[name]] = pooled_record([first, second])
        print(
            f"      second measurement: {second['ratio']:.2f}x; both pooled: {record['ratio']:.2f}x "
            f"(IQR {record['q1']:.2f}-{record['q3']:.2f}, {record['pairs']} pairs)",
            file=log,
        )
    return _check(results, baseline, tolerance)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fxfuse bench", description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=("cpu", "gpu"), default="cpu",
                   help="cpu (default): paired ratios on this machine; gpu: the CUDA suite")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="CI subset: fewer pairs, no torch.compile comparisons")
    p.add_argument("--cases", metavar="SUBSTRING", help="only cases whose name contains SUBSTRING")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument(
        "--baseline",
        metavar="FILE",
        help="check the run against FILE: fail when a median falls below (1 - tolerance) x the recorded median, "
        "below a case's floor, or when a case errors, is missing from the run or from FILE",
    )
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"with --baseline: the fraction a median may fall below the recorded one (default "
                        f"{DEFAULT_TOLERANCE})")  # fmt: skip
    p.add_argument(
        "--write-baseline",
        metavar="FILE",
        help="record this run's median ratios (and quartiles) in FILE; with --cases, only those entries change",
    )
    p.add_argument("--plot", metavar="PNG", help="bar chart of the speedups")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared machine a second thread that gets descheduled "
        "stalls every op, which made ratios swing 5x between pairs)",
    )
    p.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        help="what a sample measures: process CPU time (default with one thread: time spent descheduled by "
        "other jobs does not count) or wall time (default with more threads)",
    )
    p.add_argument("--pairs", type=int, help="override the number of pairs per case (>= 5)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the selection this many times and pool each case's pairs, so that its median spans minutes "
        "of the machine's load instead of seconds (for --write-baseline)",
    )
    p.add_argument(
        "--results-dir",
        metavar="DIR",
        help="gpu suite: write DIR/<date>-<device>.json and .md (merged with an existing file)",
    )
    p.add_argument(
        "--section", choices=("attention", "spp", "linear_attention", "ssm_scan"),
        help="gpu suite: run one section only",
    )
    p.add_argument("--budget-s", type=float, default=None, help="gpu suite: time budget of the section(s)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, registry: Registry | None = None) -> int:
    """Entry point of `fxfuse bench ...`; returns the exit status."""
    args = parse_args(argv)
    if args.rounds < 1:
        print(f"ERROR --rounds {args.rounds}: expected at least 1", file=sys.stderr)
        return 1
    if args.suite == "gpu":
        from fxfuse.bench.gpu import main_gpu

        return main_gpu(args)
    if registry is None:
        import fxfuse.bench.cases  # noqa: F401  (registers the CPU suite)

        registry = REGISTRY
    import torch

    config = QUICK if args.quick else FULL
    clock = args.clock or ("cpu" if args.threads == 1 else "wall")
    config = TimingConfig(args.pairs or config.pairs, config.warmup, config.sample_s, config.max_inner, clock)
    baseline = None
    if args.baseline:
        try:
            baseline = read_baseline(args.baseline, suite=args.suite, quick=args.quick, contains=args.cases)
        except (OSError, ValueError) as e:
            print(f"ERROR {e}", file=sys.stderr)
            return 1
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        rounds = [
            run_suite(registry, args.suite, quick=args.quick, contains=args.cases, config=config)
            for _ in range(args.rounds)
        ]
        results = rounds[0] if args.rounds == 1 else pool_rounds(rounds)
        outcome = gate(registry, results, baseline, args.tolerance, config) if baseline is not None else None
    finally:
        torch.set_num_threads(threads)  # callers in the same process (tests, the demo) keep their setting
    print(render_table(results, baseline))
    print(f"{len(results['cases'])} case(s) in {results['wall_s']:.0f} s", file=sys.stderr)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.plot and results["cases"]:
        from fxfuse.bench.plot import plot_speedups

        plot_speedups(results, args.plot)
    status = 0
    if args.write_baseline:
        try:
            write_baseline(results, args.write_baseline, previous=args.write_baseline if args.cases else None)
        except ValueError as e:
            print(f"ERROR {e}", file=sys.stderr)
            status = 1
    if outcome is None:
        for e in results["errors"]:
            print(f"ERROR {e['name']}: {e['reason']}", file=sys.stderr)
            status = 1
        return status
    for line in outcome.lines():
        print(line)
    return 0 if outcome.ok and status == 0 else 1
