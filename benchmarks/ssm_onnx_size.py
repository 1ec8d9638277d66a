"""ONNX file size, node count and export time of a Mamba-style model: fxfuse vs plain torch.onnx export.

The model (`examples/ssm_models.py`, `MambaModel`: residual RMS-normed Mamba-style blocks) writes its
selective scan as a Python loop over time. A plain `torch.onnx.export` (dynamo) unrolls it: the file
holds every step. `fxfuse.export_onnx` re-rolls the loop into `fxfuse::selective_scan` and lowers that to
one ONNX `Scan` per layer whose body is one step, so size and node count do not grow with L.

Also: ONNX Runtime (CPU, 1 thread) latency of the two files, paired ratio plain / fxfuse (> 1 = the
fxfuse file runs faster), and the max relative error of each file against the PyTorch model.

    .venv/bin/python benchmarks/ssm_onnx_size.py [--lengths 256 1024] [--layers 2]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fxfuse  # noqa: E402
from examples.ssm_models import make_mamba_model  # noqa: E402
from fxfuse.bench.measure import QUICK, paired_ratio  # noqa: E402
from fxfuse.onnx.check import run_onnx, tensor_leaves  # noqa: E402
from fxfuse.passes.verify import compare  # noqa: E402


def node_counts(path: str) -> tuple[int, int]:
    """(top-level nodes, nodes including those in subgraphs such as a Scan body)."""

    def total(nodes) -> int:
        return sum(1 + sum(total(a.g.node) for a in n.attribute if a.type == onnx.AttributeProto.GRAPH) for n in nodes)

    graph = onnx.load(path).graph
    return len(graph.node), total(graph.node)


def plain_export(model: torch.nn.Module, inputs: tuple, path: str) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(model, inputs, dynamo=True, opset_version=23, verbose=False)
    program.save(path)


def runner(path: str, inputs: tuple):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    sess = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), tensor_leaves(inputs))}
    return lambda: sess.run(None, feed)


def measure(length: int, layers: int, tmp: str, latency: bool) -> dict:
    model, inputs = make_mamba_model(length, layers=layers)
    plain, ours = f"{tmp}/plain_{length}.onnx", f"{tmp}/fxfuse_{length}.onnx"
    start = time.perf_counter()
    plain_export(model, inputs, plain)
    plain_s = time.perf_counter() - start
    start = time.perf_counter()
    result = fxfuse.export_onnx(model, inputs, ours, verify=False)  # the ORT check is timed apart, below
    ours_s = time.perf_counter() - start
    with torch.no_grad():
        want = tensor_leaves(model(*inputs))
    row = {"L": length, "sites": len(result.sites), "scans": result.count("Scan")}
    for side, path, seconds in (("plain", plain, plain_s), ("fxfuse", ours, ours_s)):
        top, every = node_counts(path)
        row[side] = {"bytes": os.path.getsize(path), "nodes": top, "all_nodes": every, "export_s": seconds,
                     "max_rel_err": compare(run_onnx(path, inputs), want, 1e-4).max_rel_err}  # fmt: skip
    if latency:
        row["ort"] = paired_ratio(runner(plain, inputs), runner(ours, inputs), QUICK)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--no-latency", action="store_true", help="skip the ONNX Runtime latency pairs")
    args = parser.parse_args(argv)
    rows = []
    # torch.onnx lists the torchvision ops it skips when torchvision is absent
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for length in args.lengths:
            rows.append(measure(length, args.layers, tmp, not args.no_latency))
            print(f"L={length} done", file=sys.stderr)
    print(f"\nMambaModel, {args.layers} layers, batch 2, d_model 16, d_state 8: plain torch.onnx export (dynamo, "
          "unrolled loop) vs fxfuse.export_onnx (one Scan per layer)")  # fmt: skip
    print(f"{'L':>6} {'side':<7}{'file KB':>9}{'nodes':>7}{'+bodies':>9}{'export s':>10}{'max rel err':>12}"
          f"{'ORT plain/fxfuse':>18}")  # fmt: skip
    for row in rows:
        for side in ("plain", "fxfuse"):
            r = row[side]
            ort = row.get("ort")
            ratio = f"{ort.ratio:.2f}x ({ort.baseline_s * 1e3:.2f}/{ort.optimized_s * 1e3:.2f} ms)" if ort else "-"
            print(f"{row['L']:>6} {side:<7}{r['bytes'] / 1024:>9.1f}{r['nodes']:>7}{r['all_nodes']:>9}"
                  f"{r['export_s']:>10.1f}{r['max_rel_err']:>12.1e}  {ratio if side == 'fxfuse' else ''}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
