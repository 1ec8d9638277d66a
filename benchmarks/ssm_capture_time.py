"""Capture cost of a loop over time: wall time of `fxfuse.optimize` on the 2-layer Mamba-style model of
`examples/ssm_models.py` (`make_mamba_model`), against `torch.compile`'s first call on the same model.

    python benchmarks/ssm_capture_time.py --lengths 128 256 1024
    python benchmarks/ssm_capture_time.py --lengths 1024 --compile --compile-cap 1200

Each measurement runs in a fresh subprocess (dynamo's caches, and memory, start empty). `torch.compile` runs
under a wall-clock cap: when it does not finish, its time is a lower bound and the ratio optimize / compile
printed is an upper bound (`<=`). Wall time is what the target is about; on a shared machine the process's
CPU time (also printed) is the steadier figure of the work done. Both sides run in the same grad mode
(autograd on, as `optimize` with example inputs runs the model: the graph is verified with gradients,
inductor compiles forward and backward).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
import torch
sys.path.insert(0, {root!r})
from examples.ssm_models import make_mamba_model
torch.set_num_threads({threads})
model, inputs = make_mamba_model(length={length}, layers={layers})
what = {what!r}
start, cpu = time.perf_counter(), time.process_time()
if what == "optimize":
    import fxfuse
    opt = fxfuse.optimize(model, inputs)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    rep = fxfuse.report(opt)
    applied = sum(r.status == "applied" for r in rep.rewrites)
    out, ref = opt(*inputs), model(*inputs)
    err = (out - ref).abs().max().item()
    print(json.dumps({{"seconds": seconds, "cpu_seconds": cpu, "applied": applied, "max_abs_err": err}}))
else:
    compiled = torch.compile(model)
    out = compiled(*inputs)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(json.dumps({{"seconds": seconds, "cpu_seconds": cpu}}))
"""


def run_child(what: str, length: int, layers: int, threads: int, cap: float | None) -> dict:
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = CHILD.format(root=root, threads=threads, length=length, layers=layers, what=what)
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=cap, cwd=root)
    except subprocess.TimeoutExpired:  # killed and reaped: its CPU time so far is in RUSAGE_CHILDREN
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        return {"seconds": time.perf_counter() - start, "cpu_seconds": cpu, "timed_out": True}
    if done.returncode != 0:
        raise RuntimeError(f"{what} at L={length} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["timed_out"] = False
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 1024])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-optimize", action="store_true", help="skip the optimize measurement")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile's first call")
    parser.add_argument("--compile-cap", type=float, default=1200.0, help="wall-clock cap of that call (s)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    rows = []
    for length in args.lengths:
        row: dict = {"length": length, "layers": args.layers}
        if not args.no_optimize:
            row["optimize"] = run_child("optimize", length, args.layers, args.threads, None)
            opt = row["optimize"]
            print(f"L={length}: optimize {opt['seconds']:.1f} s wall, {opt['cpu_seconds']:.1f} s CPU "
                  f"({opt['applied']} scans rewritten, max |err| {opt['max_abs_err']:.2e})", flush=True)  # fmt: skip
        if args.compile:
            row["compile"] = run_child("compile", length, args.layers, args.threads, args.compile_cap)
            comp = row["compile"]
            bound = ">=" if comp["timed_out"] else ""
            print(f"L={length}: torch.compile first call {bound}{comp['seconds']:.1f} s wall, "
                  f"{bound}{comp['cpu_seconds']:.1f} s CPU" + (" (cap reached)" if comp["timed_out"] else ""),
                  flush=True)  # fmt: skip
            if "optimize" in row:
                rel = "<=" if comp["timed_out"] else "="
                wall = row["optimize"]["seconds"] / comp["seconds"]
                cpu = row["optimize"]["cpu_seconds"] / comp["cpu_seconds"]
                print(f"L={length}: optimize / compile {rel} {wall:.3f} (wall), {rel} {cpu:.3f} (CPU)", flush=True)
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
