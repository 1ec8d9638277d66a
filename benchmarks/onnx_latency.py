"""ONNX Runtime latency of the fxfuse export vs the plain `torch.onnx.export` of the original model.

Paired ratios (plain time / fxfuse time, back to back, median over pairs; above 1.0 the fxfuse file is
faster), one ORT thread each, measured in one run on this machine:

    .venv/bin/python benchmarks/onnx_latency.py [--hf] [--full] [names...]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fxfuse  # noqa: E402
from examples import attention_models, spp_models  # noqa: E402
from fxfuse.bench.measure import FULL, QUICK, paired_ratio  # noqa: E402
from fxfuse.onnx.check import tensor_leaves  # noqa: E402


def example_models(with_hf: bool) -> dict:
    models = {name: make for name, make in spp_models.MODELS.items()}
    models.update({cls.__name__: cls.make for cls in attention_models.MODELS})
    if with_hf:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from test_onnx import _tiny_hf

        models.update({f"hf_{n}": (lambda n=n: _tiny_hf(n)) for n in ("bert", "gpt2", "llama")})
    return models


def session(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def runner(path: str, inputs: tuple):
    sess = session(path)
    feed = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), tensor_leaves(inputs))}
    return lambda: sess.run(None, feed)


def plain_export(model: torch.nn.Module, inputs: tuple, path: str) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(model, inputs, dynamo=True, opset_version=23, verbose=False)
    program.save(path)
    return len(program.model_proto.graph.node)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="*")
    parser.add_argument("--hf", action="store_true", help="add tiny Hugging Face BERT / GPT-2 / Llama-GQA")
    parser.add_argument("--full", action="store_true", help="more pairs, longer samples")
    args = parser.parse_args(argv)
    config = FULL if args.full else QUICK
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in example_models(args.hf).items():
            if args.names and name not in args.names:
                continue
            model, inputs = make()
            plain, ours = f"{tmp}/{name}_plain.onnx", f"{tmp}/{name}_fxfuse.onnx"
            plain_nodes = plain_export(model, inputs, plain)
            result = fxfuse.export_onnx(model, inputs, ours)
            m = paired_ratio(runner(plain, inputs), runner(ours, inputs), config)
            nodes = sum(result.node_counts.values())
            rows.append(
                (name, len(result.sites), plain_nodes, nodes, m, result.max_rel_err["example inputs"])
            )
            print(f"{name}: {m.ratio:.2f}x", file=sys.stderr)
    print(
        f"\nONNX Runtime latency, plain torch.onnx export / fxfuse export (paired, median of {config.pairs}, "
        "1 thread, this machine; > 1 = fxfuse faster)"
    )
    print(
        f"{'model':<20}{'fused':>6}{'nodes plain':>13}{'nodes fxfuse':>14}{'ratio':>8}  {'q1..q3':<12}"
        f"{'plain ms':>9}{'fxfuse ms':>10}{'max rel err':>12}"
    )
    for name, sites, pn, fn, m, err in rows:
        print(
            f"{name:<20}{sites:>6}{pn:>13}{fn:>14}{m.ratio:>7.2f}x  {m.q1:.2f}..{m.q3:<6.2f}"
            f"{m.baseline_s * 1e3:>9.3f}{m.optimized_s * 1e3:>10.3f}{err:>12.1e}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
