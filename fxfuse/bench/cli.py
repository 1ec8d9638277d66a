"""`fxfuse bench`: run a suite, print a table, optionally write JSON / a plot and check against a baseline.

Exit status: 0 when every case ran (or was skipped for a stated reason) and no ratio regressed; 1 when
a case regressed below its baseline or raised an error (the message names the case).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import TextIO

from fxfuse.bench.measure import FULL, QUICK, Measurement, TimingConfig, paired_ratio
from fxfuse.bench.registry import REGISTRY, Case, Registry, SkipCase
from fxfuse.bench.regression import DEFAULT_TOLERANCE, check, load_baseline, write_baseline
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


def case_record(name: str, group: str, m: Measurement, setup_s: float) -> dict:
    return {
        "name": name,
        "group": group,
        "ratio": m.ratio,
        "q1": m.q1,
        "q3": m.q3,
        "min": m.min,
        "max": m.max,
        "iqr_rel": m.iqr_rel,
        "pairs": m.pairs,
        "inner": m.inner,
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


def run_suite(
    registry: Registry,
    suite: str = "cpu",
    *,
    quick: bool = False,
    contains: str | None = None,
    config: TimingConfig | None = None,
    log: TextIO = sys.stderr,
) -> dict:
    """Measure every selected case; returns the results dict written by --json."""
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
        "skipped": [],
        "errors": [],
    }
    selected = list(registry.select(suite, quick=quick, contains=contains))
    for i, c in enumerate(selected, 1):
        if isinstance(c, tuple):
            label, exc = c
            bucket = "skipped" if isinstance(exc, (ImportError, SkipCase, FileNotFoundError)) else "errors"
            reason = f"{type(exc).__name__}: {exc}"
            results[bucket].append({"name": label, "reason": reason})
            print(f"[{i}/{len(selected)}] {label}: {'skipped' if bucket == 'skipped' else 'ERROR'}: {reason}", file=log)
            continue
        print(f"[{i}/{len(selected)}] {c.name} ...", file=log, flush=True)
        t0 = time.perf_counter()
        try:
            base, opt = c.setup()
        except (SkipCase, ImportError) as e:
            results["skipped"].append({"name": c.name, "reason": str(e)})
            print(f"      skipped: {e}", file=log)
            continue
        except Exception as e:
            results["errors"].append({"name": c.name, "reason": f"{type(e).__name__}: {e}"})
            print(f"      ERROR in setup: {type(e).__name__}: {e}", file=log)
            traceback.print_exc(file=log)
            continue
        setup_s = time.perf_counter() - t0
        record = case_record(c.name, c.group, paired_ratio(base, opt, config), setup_s)
        results["cases"].append(record)
        print(
            f"      {record['ratio']:.2f}x  (IQR {record['q1']:.2f}-{record['q3']:.2f}, "
            f"setup {setup_s:.1f} s, total {time.perf_counter() - t0:.1f} s)",
            file=log,
            flush=True,
        )
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


def render_table(results: dict, baseline: dict[str, float] | None = None) -> str:
    """Plain-text table of results["cases"], with the baseline's accepted ratio when one is given."""
    head = ("case", "speedup", "IQR", "min-max", "pairs", "orig ms", "fxfuse ms")
    if baseline is not None:
        head += ("baseline",)
    rows = []
    for c in results["cases"]:
        row = (
            c["name"],
            f"{c['ratio']:.2f}x",
            f"{c['q1']:.2f}-{c['q3']:.2f}",
            f"{c['min']:.2f}-{c['max']:.2f}",
            f"{c['pairs']}x{c['inner']}",
            f"{c['baseline_ms']:.3f}",
            f"{c['optimized_ms']:.3f}",
        )
        if baseline is not None:
            row += (f"{baseline[c['name']]:.2f}x" if c["name"] in baseline else "new",)
        rows.append(row)
    lines = [format_table(head, rows)]
    lines += [f"skipped  {s['name']}: {s['reason']}" for s in results.get("skipped", [])]
    lines += [f"ERROR    {s['name']}: {s['reason']}" for s in results.get("errors", [])]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fxfuse bench", description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--quick", action="store_true", help="CI subset: fewer pairs, no torch.compile comparisons")
    p.add_argument("--cases", metavar="SUBSTRING", help="only cases whose name contains SUBSTRING")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--baseline", metavar="FILE", help="fail when a ratio falls below baseline x (1 - tolerance)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    p.add_argument(
        "--write-baseline",
        metavar="FILE",
        help="write FILE with each case's accepted ratio: min(q1, 0.9 x median) of its pairs, the lower of old "
        "and new when FILE exists",
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
        "--results-dir",
        metavar="DIR",
        help="gpu suite: write DIR/<date>-<device>.json and .md (merged with an existing file)",
    )
    p.add_argument("--section", choices=("attention", "spp", "ssm_scan"), help="gpu suite: run one section only")
    p.add_argument("--budget-s", type=float, default=None, help="gpu suite: time budget of the section(s)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, registry: Registry | None = None) -> int:
    """Entry point of `fxfuse bench ...`; returns the exit status."""
    args = parse_args(argv)
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
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        results = run_suite(registry, args.suite, quick=args.quick, contains=args.cases, config=config)
    finally:
        torch.set_num_threads(threads)  # callers in the same process (tests, the demo) keep their setting
    baseline = load_baseline(args.baseline) if args.baseline else None
    print(render_table(results, baseline))
    print(f"{len(results['cases'])} case(s) in {results['wall_s']:.0f} s", file=sys.stderr)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.plot and results["cases"]:
        from fxfuse.bench.plot import plot_speedups

        plot_speedups(results, args.plot)
    if args.write_baseline:
        write_baseline(results, args.write_baseline, previous=args.write_baseline)
    status = 0
    for e in results["errors"]:
        print(f"ERROR {e['name']}: {e['reason']}", file=sys.stderr)
        status = 1
    if baseline is not None:
        outcome = check({c["name"]: c["ratio"] for c in results["cases"]}, baseline, args.tolerance)
        for line in outcome.lines():
            print(line, file=sys.stderr if line.startswith(("warning", "new")) else sys.stdout)
        status = status or (0 if outcome.ok else 1)
    return status
