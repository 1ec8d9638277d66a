"""The TorchDynamo backend: each graph dynamo captures is re-traced to ATen, rewritten and verified.

`optimize` drives it through `torch.compile(model, backend=..., dynamic=False)`; it is also registered as
`torch.compile(model, backend="fxfuse")` (entry point `torch_dynamo_backends`, and on import).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.fx

from fxfuse import families
from fxfuse.backends import check_backend
from fxfuse.passes.capture import aten_graph
from fxfuse.passes.rewrite import check_whole_graph, rewrite_patterns
from fxfuse.report import Report


@dataclass(frozen=True)
class Options:
    """What `optimize` was asked to do; validated on construction."""

    patterns: tuple[str, ...] | None = None
    backend: str = "auto"
    verify: bool = True
    compile_rest: bool = False

    def __post_init__(self) -> None:
        check_backend(self.backend)
        if self.patterns is not None:
            unknown = [p for p in self.patterns if p not in families.FAMILIES]
            if unknown:
                raise ValueError(f"unknown pattern(s) {unknown}; available: {', '.join(families.names())}")


def _warn(report: Report, message: str) -> None:
    report.notes.append(message)
    warnings.warn(f"fxfuse: {message}", stacklevel=3)


def optimize_graph(
    gm: torch.fx.GraphModule, example_inputs: Sequence[object], options: Options, report: Report
) -> Callable:
    """Rewrite one dynamo graph; returns what dynamo should run (the captured graph when nothing applied)."""
    # Capture and verification run the graph and its backward; under the caller's saved-tensor hooks
    # (activation checkpointing recompiling for a new input) those runs would count as the region's own.
    with torch.autograd.graph.saved_tensors_hooks(_same, _same):
        aten = _rewrite_graph(gm, example_inputs, options, report)
    if options.compile_rest and isinstance(aten, torch.fx.GraphModule):
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(aten, list(example_inputs))
    return aten


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _rewrite_graph(
    gm: torch.fx.GraphModule, example_inputs: Sequence[object], options: Options, report: Report
) -> Callable:
    report.graphs += 1
    graph_id = report.graphs
    if any(isinstance(x, torch.SymInt) for x in example_inputs):
        _warn(report, f"graph {graph_id}: dynamic shapes are not rewritten (fxfuse specializes on shapes); "
                      "compile with dynamic=False to have them optimized")
        return gm.forward
    try:
        aten = aten_graph(gm, example_inputs)
    except Exception as exc:
        _warn(report, f"graph {graph_id}: could not re-trace to ATen ({type(exc).__name__}: {exc}); "
                      "it runs as dynamo captured it, unoptimized")
        return gm.forward
    try:
        aten, rewrites, notes = rewrite_patterns(aten, options.patterns, options.backend, options.verify)
    except Exception as exc:  # a matcher bug must never break the user's model
        _warn(report, f"graph {graph_id}: pattern search failed ({type(exc).__name__}: {exc}); "
                      "it runs unoptimized")
        return gm.forward
    for note in notes:
        _warn(report, f"graph {graph_id}: {note}")
    for r in rewrites:
        r.graph = graph_id
    report.rewrites.extend(rewrites)
    applied = [r for r in rewrites if r.status == "applied"]
    if not applied:
        return gm.forward
    real = all(not isinstance(x, torch._subclasses.FakeTensor) for x in example_inputs)
    if options.verify and real:
        check = check_whole_graph(gm, aten, example_inputs)
        if not check.ok:
            for r in applied:
                r.status, r.reason = "rejected", f"whole-graph check failed after rewriting: {check.reason}"
            _warn(report, f"graph {graph_id}: the rewritten graph did not match the original "
                          f"({check.reason}); all its rewrites were withdrawn")
            return gm.forward
    return aten


def make_backend(options: Options, report: Report) -> Callable:
    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        return optimize_graph(gm, example_inputs, options, report)

    return backend


LAST_REPORT = Report()


def fxfuse_backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
    """`torch.compile(model, backend="fxfuse")`: default options; the report is `fxfuse.last_report()`."""
    return optimize_graph(gm, example_inputs, Options(), LAST_REPORT)
