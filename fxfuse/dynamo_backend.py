"""The TorchDynamo backend: each graph dynamo captures is re-traced to ATen, rewritten and verified.

`optimize` drives it through `torch.compile(model, backend=..., dynamic=False)`; it is also registered as
`torch.compile(model, backend="fxfuse")` (entry point `torch_dynamo_backends`, and on import).
"""

from __future__ import annotations

import inspect
import sys
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch._dynamo
import torch.fx

from fxfuse import families
from fxfuse.backends import check_backend, resolve, triton_available
from fxfuse.passes.buffer_values import guard_buffers, mark_buffers
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


def backend_note(backend: str, example_inputs: Sequence[object]) -> str | None:
    """Why the fused ops cannot run on the backend asked for, with these inputs (None when they can)."""
    device = next((x.device for x in example_inputs if isinstance(x, torch.Tensor)), None)
    if backend in ("auto", "reference") or device is None or resolve(backend, device) == backend:
        return None
    if backend == "triton" and not triton_available():
        why = "triton is not installed"
    elif backend == "triton":
        why = (f"the inputs are on {device.type}, and Triton kernels run on CUDA tensors (on CPU only under "
               "TRITON_INTERPRET=1, set before triton is imported)")  # fmt: skip
    else:
        why = f"the inputs are on {device.type}, and the CPU fast paths run on CPU tensors"
    return f"backend={backend!r}: {why}; the fused ops run their reference implementation"


def optimize_graph(
    gm: torch.fx.GraphModule, example_inputs: Sequence[object], options: Options, report: Report
) -> Callable:
    """Rewrite one dynamo graph; returns what dynamo should run (the captured graph when nothing applied)."""
    # Capture and verification run the graph and its backward; under the caller's saved-tensor hooks
    # (activation checkpointing recompiling for a new input) those runs would count as the region's own.
    with torch.autograd.graph.saved_tensors_hooks(_same, _same):
        aten = _rewrite_graph(gm, example_inputs, options, report)
    run = aten
    if options.compile_rest and isinstance(aten, torch.fx.GraphModule):
        from torch._inductor.compile_fx import compile_fx

        try:
            run = compile_fx(aten, list(example_inputs))
        except Exception as exc:
            # Left to dynamo, this error would make it run the whole frame eagerly, as the user wrote it,
            # while the report counted rewrites that never run: keep them, uncompiled.
            _warn(report, f"graph {report.graphs}: Inductor could not compile the rewritten graph "
                          f"({type(exc).__name__}: {_first_line(exc)}); it runs rewritten but uncompiled")
    graph_id = report.graphs
    return guard_buffers(run, gm.forward, aten, example_inputs, lambda m: report.notes.append(f"graph {graph_id}: {m}"))


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _rewrite_graph(
    gm: torch.fx.GraphModule, example_inputs: Sequence[object], options: Options, report: Report
) -> Callable:
    report.graphs += 1
    graph_id = report.graphs
    note = backend_note(options.backend, example_inputs)
    if note is not None and note not in report.notes:
        report.notes.append(note)
    if any(isinstance(x, torch.SymInt) for x in example_inputs):
        _warn(report, f"graph {graph_id}: dynamic shapes are not rewritten (fxfuse specializes on shapes); "
                      "compile with dynamic=False to have them optimized")
        return gm.forward
    try:
        aten = aten_graph(gm, example_inputs, copy_loops=options.verify)
    except Exception as exc:
        _warn(report, f"graph {graph_id}: could not re-trace to ATen ({type(exc).__name__}: {exc}); "
                      "it runs as dynamo captured it, unoptimized")
        return gm.forward
    mark_buffers(gm, aten, example_inputs)
    # the graph trains when autograd is on and an input (a parameter, say) requires grad
    grad = [torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs]
    try:
        aten, rewrites, notes = rewrite_patterns(aten, options.patterns, options.backend, options.verify, grad)
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


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""


def make_backend(options: Options, report: Report) -> Callable:
    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        return optimize_graph(gm, example_inputs, options, report)

    return backend


# torch.compile(..., backend="fxfuse"): one report per compiled model (or function), kept while it lives
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_UNATTRIBUTED = Report()  # graphs whose torch.compile wrapper could not be found on the stack
_LAST: list[Report] = [Report()]


def compiled_target(compiled: object) -> object | None:
    """What `torch.compile(target, ...)` was given, for the object it returned (None for anything else)."""
    if isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule):
        return compiled._orig_mod
    target = getattr(compiled, "_torchdynamo_orig_callable", None)
    return None if target is None else _unwrap(target)


def _unwrap(fn: object) -> object:
    while hasattr(fn, "__wrapped__") and not isinstance(fn, torch.nn.Module):
        fn = fn.__wrapped__
    if inspect.ismethod(fn):
        return fn.__self__ if isinstance(fn.__self__, torch.nn.Module) else fn.__func__
    return fn


def _compiling_target() -> object | None:
    """The model or function whose torch.compile wrapper is running now. Dynamo compiles a frame when it
    is first called, from inside that wrapper's call (also for a graph break's later frames, e.g. in a
    submodule), so the wrapper's frame, which holds the callable it was made for, is on the stack."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "compile_wrapper" and code.co_filename == torch._dynamo.eval_frame.__file__:
            fn = frame.f_locals.get("fn")
            return None if fn is None else _unwrap(fn)
        frame = frame.f_back
    return None


def compiled_report(target: object) -> Report:
    """The live report of one model (or function) compiled with backend="fxfuse"."""
    try:
        return _COMPILED.setdefault(target, Report())
    except TypeError:  # not weakly referenceable
        return _UNATTRIBUTED


def last_compiled_report() -> Report:
    return _LAST[0]


def fxfuse_backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
    """`torch.compile(model, backend="fxfuse")`: default options; the report is `fxfuse.report(compiled)`
    (one per compiled model) or `fxfuse.last_report()` (the model compiled last)."""
    target = _compiling_target()
    report = _UNATTRIBUTED if target is None else compiled_report(target)
    _LAST[0] = report
    return optimize_graph(gm, example_inputs, Options(), report)
