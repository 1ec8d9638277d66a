"""`export_onnx`: torch.export -> the same pattern passes as `optimize` -> re-export -> ONNX, verified.

The route: `torch.export.export(model)` gives an ATen graph with FakeTensor values, the canonical IR, so
`rewrite_patterns` finds, verifies and splices the fused ops there exactly as it does for `optimize`.
The rewritten module is exported again (the fused ops trace as leaves through their fake impls) and the
torch.onnx dynamo exporter converts it, with each fused op translated to standard ONNX
(`fxfuse/onnx/spp.py`, `fxfuse/onnx/attention.py`). Every fused op is checked before anything is
written: what cannot be exported raises `ExportError` with the op and the user's source line.
"""

from __future__ import annotations

import contextlib
import io
import keyword
import logging
import os
import textwrap
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import onnx
import torch
from torch import nn

from fxfuse.onnx.check import RTOL, OrtFailure, check_file, compare_with_torch, second_inputs, tensor_leaves
from fxfuse.onnx.functions import wrap_fused_nodes
from fxfuse.onnx.layout import fold_layout_round_trips
from fxfuse.onnx.lowering import ExportError, LoweredSite, plan_lowerings, translation_table
from fxfuse.passes.capture import export_graph
from fxfuse.passes.rewrite import rewrite_patterns
from fxfuse.passes.verify import compare
from fxfuse.report import WIDTH, Report, fit, location_parts


@dataclass
class OnnxExport:
    """What `export_onnx` wrote and how well ONNX Runtime reproduces the PyTorch model."""

    path: str
    node_counts: dict[str, int]  # top-level graph nodes by op type ("fxfuse.attention" for fused nodes)
    sites: list[LoweredSite]  # fused ops lowered, with what each became
    max_rel_err: dict[str, float] = field(default_factory=dict)  # inputs -> ORT vs PyTorch (empty: not run)
    report: Report = field(default_factory=Report)
    notes: list[str] = field(default_factory=list)

    def count(self, op_type: str) -> int:
        return self.node_counts.get(op_type, 0)

    def __str__(self) -> str:
        total = sum(self.node_counts.values())
        top = ", ".join(f"{k} {v}" for k, v in sorted(self.node_counts.items(), key=lambda kv: -kv[1])[:12])
        lines = textwrap.wrap(f"ONNX export: {self.path} ({total} nodes: {top})", WIDTH, subsequent_indent="  ")
        if self.sites:
            lines.append(f"{len(self.sites)} fused op(s) lowered:")
            for s in self.sites:
                where, code = location_parts(s.location)
                lines += textwrap.wrap(f"{s.op} at {where} -> {s.lowered_as}", WIDTH, initial_indent="  ",
                                       subsequent_indent="      ")  # fmt: skip
                lines += [] if code is None else [fit(f"      {code}")]
        else:
            lines.append("no fused ops: the file is the plain export of the model")
        if any(op.startswith("fxfuse.") for op in self.node_counts):
            lines.append("fused ops kept as fxfuse-domain nodes (ONNX local functions of standard ops)")
        if self.max_rel_err:
            errs = "; ".join(f"{k}: {v:.1e}" for k, v in self.max_rel_err.items())
            text = f"ONNX Runtime vs PyTorch, max relative error (tolerance {RTOL:.0e}): {errs}"
            lines += textwrap.wrap(text, WIDTH, subsequent_indent="  ")
        else:
            lines.append("not verified in ONNX Runtime (verify=False)")
        lines += [w for n in self.notes for w in textwrap.wrap(f"note: {n}", WIDTH, subsequent_indent="      ")]
        lines += ["", str(self.report)]
        return "\n".join(lines)

    __repr__ = __str__


class _Keywords(nn.Module):
    """Calls `model(**dict(zip(names, args)))`: keyword example inputs (encoder-decoders, Whisper) become
    positional ONNX inputs, named after the keywords. The model's children, parameters and buffers are
    registered here under their own names, so module paths in the report and parameter names in the file
    are the model's."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        object.__setattr__(self, "wrapped", model)  # not a child: its children are ours
        self.names = tuple(names)
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, p in model.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in model.named_buffers(recurse=False):
            self.register_buffer(name, b)

    def forward(self, *args):
        return self.wrapped(**dict(zip(self.names, args, strict=True)))


def _keywords(model: nn.Module, names: Sequence[str]) -> _Keywords:
    """A `_Keywords` whose forward takes the keywords as named parameters (torch.export names the ONNX
    inputs after them)."""
    bad = [n for n in names if not isinstance(n, str) or not n.isidentifier() or keyword.iskeyword(n)]
    if bad or len(set(names)) != len(names):
        raise ValueError(f"keyword example inputs need distinct Python identifiers as keys, got {list(names)}")
    params = ", ".join(names)
    namespace: dict = {}
    exec(f"def forward(self, {params}):\n    return _Keywords.forward(self, {params})", {"_Keywords": _Keywords},
         namespace)  # fmt: skip
    cls = type(f"Keywords_{type(model).__name__}", (_Keywords,), {"forward": namespace["forward"]})
    return cls(model, names)


def _unwrap(model: nn.Module, patterns, backend: str) -> tuple[nn.Module, Sequence[str] | None, str]:
    from fxfuse.api import OptimizedModule

    if isinstance(model, OptimizedModule):
        options = model.options
        return model.original, patterns if patterns is not None else options.patterns, options.backend
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx expects a torch.nn.Module, got {type(model).__name__}")
    return model, patterns, backend


def check_writable(path: str) -> None:
    """Fail before exporting (which takes seconds to minutes) when `path` cannot be written."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory; give a file name such as {os.path.join(path, 'model.onnx')}")
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise NotADirectoryError(f"cannot write {path}: {parent} is a file, not a directory")
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"cannot write {path}: the directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise PermissionError(f"cannot write {path}: permission denied")


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx lists the torchvision ops it skips when torchvision is absent (at warning level),
    torch.export trips over its own deprecated `LeafSpec` check, and ONNX's reference evaluator warns on
    numpy edge cases while folding constants: none of it concerns the user's export."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            # constant folding evaluates e.g. T5's log of relative positions, log(0) included
            warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"onnx\.reference\.")
            yield
    finally:
        registration.setLevel(level)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Export runs in inference (dropout off, batch-norm statistics frozen); the mode is restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def _without_kv_cache(model: nn.Module, notes: list[str]):
    """Hugging Face decoders return their KV cache (a DynamicCache object, not tensors) unless
    `config.use_cache` is off; torch.export cannot output it, and an ONNX file of one forward pass has no
    use for it. Export with the cache off (the hidden states are the same) and say so; restored after."""
    # every config in the tree: an encoder-decoder's stacks hold copies of their own (T5)
    found = (getattr(m, "config", None) for m in model.modules())
    configs = {id(c): c for c in found if getattr(c, "use_cache", False) is True}
    if not configs:
        yield
        return
    for config in configs.values():
        config.use_cache = False
    notes.append("exported with config.use_cache=False: the KV cache object is not an ONNX output "
                 "(the model's other outputs are unchanged)")  # fmt: skip
    try:
        yield
    finally:
        for config in configs.values():
            config.use_cache = True


def _capture(model: nn.Module, args: tuple, dynamic_shapes) -> torch.fx.GraphModule:
    try:
        return export_graph(model, args, dynamic_shapes)
    except Exception as exc:
        raise ExportError(
            f"torch.export could not capture {type(model).__name__} ({type(exc).__name__}: "
            f"{str(exc)[:300]}); ONNX export needs a model torch.export can trace (optimize does not)"
        ) from exc


def _rewrite(model: nn.Module, args: tuple, dynamic_shapes, patterns, backend: str, verify: bool):
    """torch.export + the pattern passes; returns the rewritten module and its report."""
    gm, rewrites, notes = rewrite_patterns(_capture(model, args, dynamic_shapes), patterns, backend, verify)
    for r in rewrites:
        r.graph = 1  # torch.export captures one graph; numbered as optimize numbers its first
    report = Report(rewrites=rewrites, notes=list(notes), graphs=1, verified=verify)
    applied = [r for r in rewrites if r.status == "applied"]
    if verify and applied:
        with torch.no_grad():  # outputs may be dicts / ModelOutput: compare their tensors in pytree order
            check = compare(tensor_leaves(gm(*args)), tensor_leaves(model(*args)), RTOL)
        if not check.ok:
            for r in applied:
                r.status, r.reason = "rejected", f"whole-graph check failed after rewriting: {check.reason}"
            report.notes.append(
                f"the rewritten graph did not match the original ({check.reason}); exported without rewrites"
            )
            gm = _capture(model, args, dynamic_shapes)
    return gm, report


def _to_onnx(gm: torch.fx.GraphModule, args: tuple, dynamic_shapes, opset: int, optimize: bool):
    ep = torch.export.export(gm, args, dynamic_shapes=dynamic_shapes, strict=False)
    # the exporter narrates each step on stdout, and its constant folder logs shapes it skips as warnings
    # (harmless); the result object tells the story instead
    folding = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = folding.level
    folding.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            program = torch.onnx.export(
                ep,
                args,
                dynamo=True,
                opset_version=opset,
                verbose=False,
                optimize=optimize,
                custom_translation_table=translation_table(),
            )
    finally:
        folding.setLevel(level)
    return ep, program.model_proto


def _node_counts(proto: onnx.ModelProto) -> dict[str, int]:
    # fused nodes are named <op>_<site>; count them by op
    return dict(
        Counter(
            n.op_type if not n.domain else f"{n.domain}.{n.op_type.rsplit('_', 1)[0]}"
            for n in proto.graph.node
        )
    )


def _verify(result: OnnxExport, ep: torch.export.ExportedProgram, model: nn.Module, args: tuple) -> None:
    check_file(result.path)
    runs = [("example inputs", args)]
    more = second_inputs(ep, args)
    if more is not None:
        shapes = ", ".join(str(list(x.shape)) for x in tensor_leaves(more))
        runs.append((f"second shape {shapes}", more))
    for label, inputs in runs:
        check = compare_with_torch(result.path, model, inputs)
        if not check.ok:
            kept = _set_aside(result.path)
            raise ExportError(
                f"ONNX Runtime does not reproduce the PyTorch model on the {label}: {check.reason}; "
                f"the file was moved to {kept} for inspection; please report this with the model"
            )
        result.max_rel_err[label] = check.max_rel_err


def export_onnx(
    model: nn.Module,
    example_inputs: Sequence[object] | dict[str, object] | torch.Tensor,
    path: str | os.PathLike,
    *,
    opset: int = 23,
    dynamic_shapes: dict | tuple | list | None = None,
    verify: bool = True,
    fused_nodes: bool = False,
    patterns: Sequence[str] | None = None,
    backend: str = "auto",
) -> OnnxExport:
    """Optimize `model` (or take an `fxfuse.optimize`d one) and write it to `path` as standard ONNX.

    Each fused attention becomes one ONNX `Attention` node (or, for what Attention cannot express, an
    explicit MatMul/Softmax subgraph, said in the result); each SPP a MaxPool cascade + Concat. With
    `fused_nodes=True` every fused op is one `fxfuse`-domain node whose body (an ONNX local function) holds
    those standard ops, so any runtime still runs it. `dynamic_shapes` is torch.export's argument.
    With `verify`, rewrites are verified as in `optimize`, the file passes `onnx.checker` (full check),
    and ONNX Runtime must match the PyTorch model within 1e-4 relative on the example inputs (and at a
    second size of every dynamic dimension); otherwise ExportError. `example_inputs` may be a dict of
    keyword arguments (encoder-decoders: input_ids=..., decoder_input_ids=...): they become ONNX inputs of
    those names, in the dict's order, and `dynamic_shapes` may then be a dict keyed the same way.
    """
    if opset < 23:
        raise ValueError(f"opset={opset}: fused attention lowers to ONNX Attention, which needs opset >= 23")
    path = os.fspath(path)
    check_writable(path)
    with _quiet_exporter():
        return _export(model, example_inputs, path, opset, dynamic_shapes, verify, fused_nodes, patterns, backend)


def _export(model, example_inputs, path: str, opset: int, dynamic_shapes, verify: bool, fused_nodes: bool,
            patterns, backend: str) -> OnnxExport:  # fmt: skip
    original, patterns, backend = _unwrap(model, patterns, backend)
    inner = original
    if isinstance(example_inputs, dict):
        names = list(example_inputs)
        args = tuple(example_inputs.values())
        if isinstance(dynamic_shapes, dict):
            dynamic_shapes = tuple(dynamic_shapes.get(name) for name in names)
        original = _keywords(inner, names)
    else:
        args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    notes: list[str] = []
    with _eval_mode(inner), _without_kv_cache(inner, notes):
        gm, report = _rewrite(original, args, dynamic_shapes, patterns, backend, verify)
        sites = plan_lowerings(gm)
        ep, result = _write(gm, args, dynamic_shapes, opset, path, sites, report, fused_nodes, optimize=True)
        result.notes[:0] = notes
        if not verify:
            return result
        try:
            _verify(result, ep, original, args)
        except OrtFailure as exc:
            # the torch.onnx graph optimizer has bugs of its own (a RotaryEmbedding fusion that ORT rejects
            # with a dynamic batch): write the file again without it
            ep, result = _write(gm, args, dynamic_shapes, opset, path, sites, report, fused_nodes, False)
            result.notes[:0] = notes
            result.notes.insert(
                0,
                f"ONNX Runtime rejected the torch.onnx-optimized graph ({str(exc)[:160]}); "
                "written without torch.onnx's graph optimizations",
            )
            try:
                _verify(result, ep, original, args)
            except OrtFailure as again:
                kept = _set_aside(path)
                raise ExportError(
                    f"ONNX Runtime cannot run the exported model (moved to {kept}): {again}"
                ) from again
    return result


def _write(gm, args, dynamic_shapes, opset: int, path: str, sites, report, fused_nodes: bool, optimize: bool):
    ep, proto = _to_onnx(gm, args, dynamic_shapes, opset, optimize)
    fold_layout_round_trips(proto)
    notes = wrap_fused_nodes(proto, sites) if fused_nodes else []
    onnx.save(proto, path)
    return ep, OnnxExport(path, _node_counts(proto), sites, report=report, notes=notes)


def _set_aside(path: str) -> str:
    """Never leave a file that computes something else (or nothing) where the user expects the model."""
    kept = f"{path}.rejected"
    os.replace(path, kept)
    return kept
