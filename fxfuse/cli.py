"""`fxfuse demo | explain FACTORY | export FACTORY -o m.onnx | bench ...`: one-line errors, exit status 2
for a wrong request, 1 for a failure (FXFUSE_VERBOSE=1 shows its traceback)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import torch

# One model per family at a size where fusing pays, a near miss (left alone, with the reason) and a model
# with nothing to fuse. They live in the repository's `examples` package, not in the installed fxfuse.
DEMO_FACTORIES = (
    "examples.spp_models:make_yolo_spp",
    "examples.spp_models:make_yolo_sppf",
    "examples.spp_models:make_sppnet",
    "examples.attention_models:make_attention_heavy",
    "examples.attention_models:make_padded_mha",
    "examples.attention_models:make_gqa_decoder",
    "examples.linear_attention_models:make_linear_transformer",
    "examples.ssm_models:make_mamba_block_128",
    "examples.attention_models:make_attention_with_probs",
    "examples.spp_models:make_plain_cnn",
)


class CliError(Exception):
    """A mistake in what was asked for: printed as one line, exit status 2."""


def _module_name_of(path: Path) -> tuple[str, Path]:
    """(dotted module name, directory to import it from) for a .py file: inside a package (folders with
    __init__.py) the name includes the packages, so the file's relative imports work."""
    path = path.resolve()
    parts, root = [path.stem], path.parent
    while (root / "__init__.py").is_file():
        parts.insert(0, root.name)
        root = root.parent
    return ".".join(parts), root


def _import(module_ref: str):
    """A module by dotted name (the current directory importable, as with `python -m`) or by file path."""
    if module_ref.endswith(".py") or os.sep in module_ref or "/" in module_ref:
        path = Path(module_ref)
        if not path.is_file():
            raise CliError(f"no such file: {module_ref}")
        module_name, root = _module_name_of(path)
        sys.path.insert(0, str(root))  # its sibling modules (or its package) import as they do for python
        if "." not in module_name:  # a lone file: load it as itself even when a module of its name exists
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = sys.modules[module_name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    else:
        module_name = module_ref
        if "" not in sys.path:
            sys.path.insert(0, "")
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name + ".").startswith(exc.name + "."):  # the module itself, not its imports
            raise CliError(
                f"cannot import {module_ref!r}: no module {exc.name!r} (run from the folder that holds it, "
                "or give a file path such as ./mymodels.py:make_model)"
            ) from exc
        raise


def load_factory(spec: str) -> Callable:
    """`package.module:function`, `path/to/file.py:function` or `module:Class.make` -> the callable."""
    module_ref, sep, attr = spec.rpartition(":")
    if not sep or not module_ref or not attr:
        raise CliError(f"expected MODULE:FACTORY or FILE.py:FACTORY (e.g. examples.spp_models:make_yolo_spp), "
                       f"got {spec!r}")  # fmt: skip
    target = _import(module_ref)
    for part in attr.split("."):
        if not hasattr(target, part):
            raise CliError(f"{module_ref} has no {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise CliError(f"{spec} is not callable")
    return target


def build(spec: str) -> tuple[torch.nn.Module, tuple | dict]:
    """Call a factory; it returns (model, example_inputs): a tuple of positional inputs, a dict of keyword
    inputs, or one tensor."""
    made = load_factory(spec)()
    if isinstance(made, torch.nn.Module) or not (isinstance(made, (tuple, list)) and len(made) == 2):
        raise CliError(f"{spec} must return (model, example_inputs), got {type(made).__name__}")
    model, inputs = made
    if isinstance(inputs, dict):
        return model, inputs
    return model, tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def pattern_list(text: str) -> list[str]:
    """`--patterns attention,spp` -> the names, checked against the registered families."""
    from fxfuse import families

    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in families.FAMILIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown pattern(s) {', '.join(unknown) or repr(text)}; choose from {', '.join(families.names())}"
        )
    return names


def cmd_explain(args: argparse.Namespace) -> int:
    import fxfuse

    model, inputs = build(args.factory)
    opt = fxfuse.optimize(model, inputs, patterns=args.patterns, backend=args.backend)
    rep = fxfuse.report(opt)
    print(rep.to_json() if args.json else rep)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import fxfuse
    from fxfuse.onnx.export import check_writable

    try:
        check_writable(args.output)  # before the factory builds a model and the export runs
    except OSError as exc:
        raise CliError(str(exc)) from exc
    model, inputs = build(args.factory)
    result = fxfuse.export_onnx(
        model, inputs, args.output, opset=args.opset, fused_nodes=args.fused_nodes, patterns=args.patterns,
        backend=args.backend,
    )  # fmt: skip
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
    if not args.factories:
        if "" not in sys.path:
            sys.path.insert(0, "")  # as _import does: the current directory, as with `python -m`
        if importlib.util.find_spec("examples") is None:
            raise CliError("the demo's models are in the `examples` package of the fxfuse repository, which is "
                           "not installed: run `fxfuse demo` from the repository root")  # fmt: skip
    rows = []
    for spec in args.factories or DEMO_FACTORIES:
        try:
            model, inputs = build(spec)
        except CliError as exc:
            print(f"skipping {spec}: {exc}")
            continue
        name = spec.split(":")[-1].removeprefix("make_").removesuffix(".make")
        print(f"\n=== {name} ({type(model).__name__})")
        opt = fxfuse.optimize(model, inputs)
        print(fxfuse.report(opt))
        with torch.no_grad():
            err = compare(opt(*inputs), model(*inputs), 1e-4)
            m = paired_ratio(lambda m=model, x=inputs: m(*x), lambda o=opt, x=inputs: o(*x), config)
        rep = fxfuse.report(opt)
        left = len({(r.pattern, r.location) for r in rep.rejected()})
        rows.append((name, rep.count(), left, m.ratio, m.q1, m.q3, err.max_rel_err))
    if not rows:
        raise CliError("no model could be built (see the lines above)")
    print(f"\nspeedup: original / optimized CPU time, 1 thread, median of {config.pairs} paired runs on this "
          "machine\n(q1..q3: its quartiles; above 1.00x the optimized model is faster)")  # fmt: skip
    print("fused: sites rewritten; left alone: sites found but not rewritten (the reason is in its report)")
    print("max diff: largest relative difference of the optimized model's outputs from the original's")
    print(f"{'model':<24}{'fused':>6}{'left alone':>11}{'speedup':>9}{'  q1..q3':<15}{'max diff':>9}")
    for name, n, left, ratio, q1, q3, err in rows:
        print(f"{name:<24}{n:>6}{left:>11}{ratio:>8.2f}x  {q1:.2f}..{q3:.2f}   {err:>8.1e}")
    return 0


class _Parser(argparse.ArgumentParser):
    """Errors in one line (argparse prints the usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def make_parser() -> argparse.ArgumentParser:
    from fxfuse import __version__, families
    from fxfuse.backends import BACKENDS

    patterns_help = f"comma-separated pattern families to look for (default: all): {', '.join(families.names())}"
    backend_help = (
        "which implementation the fused ops run: auto (CUDA: triton, CPU: cpu), triton, cpu or reference "
        "(the plain-PyTorch one)"
    )
    factory_help = "MODULE:FACTORY or FILE.py:FACTORY, a function returning (model, example_inputs)"
    description = (
        f"Find the pattern families {', '.join(families.names())} in a PyTorch model, verify each rewrite "
        "and replace it with a fused op. FACTORY is a function returning (model, example_inputs): "
        "package.module:make_model, path/to/file.py:make_model or module:Class.make. "
        "Errors print one line; FXFUSE_VERBOSE=1 shows tracebacks."
    )
    epilog = """examples (from the repository root; its `examples` package is not installed):
  fxfuse demo
  fxfuse explain examples.spp_models:make_yolo_spp
  fxfuse explain ./mymodels.py:make_model --json       (your own factory)
  fxfuse export examples.spp_models:make_yolo_spp -o yolo.onnx
  fxfuse bench --quick
`fxfuse COMMAND --help` lists a command's options."""
    parser = _Parser(prog="fxfuse", description=textwrap.fill(description, 79), epilog=epilog,
                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--version", action="version", version=f"fxfuse {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="optimize the example models; print reports and a speedup table")
    demo.add_argument("factories", nargs="*", metavar="FACTORY", help=f"{factory_help} (default: the examples)")
    explain = sub.add_parser("explain", help="print what optimize finds in FACTORY's model")
    explain.add_argument("factory", metavar="FACTORY", help=factory_help)
    explain.add_argument("--backend", default="auto", choices=BACKENDS, help=backend_help)
    explain.add_argument("--patterns", type=pattern_list, metavar="NAMES", help=patterns_help)
    explain.add_argument("--json", action="store_true", help="print the report as JSON")
    export = sub.add_parser("export", help="export FACTORY's model to ONNX with its fused ops lowered")
    export.add_argument("factory", metavar="FACTORY", help=factory_help)
    export.add_argument("-o", "--output", required=True, metavar="FILE.onnx", help="where to write the model")
    export.add_argument("--opset", type=int, default=23, help="ONNX opset, 23 or newer (default: 23)")
    export.add_argument("--backend", default="auto", choices=BACKENDS, help=backend_help)
    export.add_argument("--patterns", type=pattern_list, metavar="NAMES", help=patterns_help)
    export.add_argument("--fused-nodes", action="store_true", help="keep each fused op as one fxfuse-domain node")
    sub.add_parser("bench", help="paired speedup benchmarks (see `fxfuse bench --help`)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        from fxfuse.bench.cli import main as bench_main

        return bench_main(argv[1:])
    parser = make_parser()
    args = parser.parse_args(argv)
    command = {"demo": cmd_demo, "explain": cmd_explain, "export": cmd_export}[args.command]
    try:
        return command(args)
    except CliError as exc:
        parser.exit(2, f"fxfuse {args.command}: error: {exc}\n")
    except Exception as exc:
        if os.environ.get("FXFUSE_VERBOSE", "0") not in ("", "0"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        parser.exit(1, f"fxfuse {args.command}: {type(exc).__name__}: {first} (FXFUSE_VERBOSE=1 for the traceback)\n")


if __name__ == "__main__":
    sys.exit(main())
