"""`fxfuse demo | explain MODULE:FACTORY | export MODULE:FACTORY -o m.onnx | bench ...`"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

import torch

DEMO_FACTORIES = (
    "examples.spp_models:make_yolo_spp",
    "examples.spp_models:make_yolo_sppf",
    "examples.spp_models:make_sppnet",
    "examples.attention_models:make_attention_heavy",
    "examples.attention_models:make_padded_mha",
    "examples.attention_models:make_gqa_decoder",
    "examples.spp_models:make_plain_cnn",
)


def load_factory(spec: str) -> Callable:
    """`package.module:function` (or `module:Class.make`) -> the callable; the current directory is
    importable, as with `python -m`."""
    if ":" not in spec:
        raise SystemExit(f"expected MODULE:FACTORY (e.g. examples.spp_models:make_yolo_spp), got {spec!r}")
    module_name, attr = spec.split(":", 1)
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        target = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(f"cannot import {module_name!r}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(target, part):
            raise SystemExit(f"{module_name} has no {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise SystemExit(f"{spec} is not callable")
    return target


def build(spec: str) -> tuple[torch.nn.Module, tuple | dict]:
    """Call a factory; it returns (model, example_inputs): a tuple of positional inputs, a dict of keyword
    inputs, or one tensor."""
    made = load_factory(spec)()
    if isinstance(made, torch.nn.Module):
        raise SystemExit(f"{spec} returned a model without example inputs; return (model, example_inputs)")
    model, inputs = made
    if isinstance(inputs, dict):
        return model, inputs
    return model, tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def cmd_explain(args: argparse.Namespace) -> int:
    import fxfuse

    model, inputs = build(args.factory)
    opt = fxfuse.optimize(model, inputs, backend=args.backend)
    rep = fxfuse.report(opt)
    print(rep.to_json() if args.json else rep)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import fxfuse

    model, inputs = build(args.factory)
    result = fxfuse.export_onnx(model, inputs, args.output, opset=args.opset, fused_nodes=args.fused_nodes)
    print(result)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import dataclasses

    import fxfuse
    from fxfuse.bench.measure import QUICK, paired_ratio
    from fxfuse.passes.verify import compare

    # As `fxfuse bench` does: one torch thread and process CPU time, so other load on a shared machine
    # does not decide the ratio.
    config = dataclasses.replace(QUICK, clock="cpu")
    torch.set_num_threads(1)
    rows = []
    for spec in args.factories or DEMO_FACTORIES:
        try:
            model, inputs = build(spec)
        except SystemExit as exc:
            print(f"skipping {spec}: {exc}")
            continue
        name = spec.split(":")[1].removeprefix("make_").removesuffix(".make")
        print(f"\n=== {name} ({type(model).__name__})")
        opt = fxfuse.optimize(model, inputs)
        print(fxfuse.report(opt))
        with torch.no_grad():
            err = compare(opt(*inputs), model(*inputs), 1e-4)
            m = paired_ratio(lambda m=model, x=inputs: m(*x), lambda o=opt, x=inputs: o(*x), config)
        rows.append((name, fxfuse.report(opt).count(), m.ratio, m.q1, m.q3, err.max_rel_err))
    print(f"\nSpeedup (eager / optimized CPU time, 1 thread; paired, median of {config.pairs} pairs, this machine):")
    print(f"{'model':<22}{'rewrites':>9}{'speedup':>9}{'  q1..q3':<15}{'max rel err':>12}")
    for name, n, ratio, q1, q3, err in rows:
        print(f"{name:<22}{n:>9}{ratio:>8.2f}x  {q1:.2f}..{q3:.2f}   {err:>10.1e}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fxfuse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="optimize the example models; print reports and a speedup table")
    demo.add_argument("factories", nargs="*", help="MODULE:FACTORY specs (default: the bundled examples)")
    explain = sub.add_parser("explain", help="print what optimize finds in MODULE:FACTORY")
    explain.add_argument("factory")
    explain.add_argument("--backend", default="auto")
    explain.add_argument("--json", action="store_true", help="print the report as JSON")
    export = sub.add_parser("export", help="export MODULE:FACTORY to ONNX with fused ops lowered")
    export.add_argument("factory")
    export.add_argument("-o", "--output", required=True)
    export.add_argument("--opset", type=int, default=23)
    export.add_argument("--fused-nodes", action="store_true", help="keep each fused op as one fxfuse-domain node")
    sub.add_parser("bench", help="paired speedup benchmarks (see `fxfuse bench --help`)", add_help=False)
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        from fxfuse.bench.cli import main as bench_main

        return bench_main(argv[1:])
    args = parser.parse_args(argv)
    return {"demo": cmd_demo, "explain": cmd_explain, "export": cmd_export}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
