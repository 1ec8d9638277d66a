"""Capture: any dynamo graph -> the canonical IR, a static-shaped ATen FX graph with FakeTensor `meta["val"]`.

TorchDynamo is the front end (it handles Python control flow, unrolls loops and breaks graphs on what it
cannot trace). Each dynamo graph is re-traced here with `make_fx(pre_dispatch=True)`: ops come out at
the ATen level *before* autograd (`aten.linear`, `aten.softmax.int`, `aten.max_pool2d`), so the returned
graph still trains when run eagerly, and every node carries its FakeTensor value. Re-running the dynamo
graph through an Interpreter under `preserve_node_meta` keeps each node's `stack_trace` and
`nn_module_stack`, which the report uses to point at the user's line.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
import torch._guards
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from fxfuse.passes.vmap_inline import inline_vmaps


def to_fake(values: Sequence[object], mode: FakeTensorMode) -> list[object]:
    return [mode.from_tensor(v, static_shapes=True) if isinstance(v, torch.Tensor) else v for v in values]


def aten_graph(fn: torch.fx.GraphModule | Callable, example_inputs: Sequence[object]) -> torch.fx.GraphModule:
    """Re-trace `fn` (a dynamo GraphModule or any callable of tensors) into the canonical ATen graph.

    Shapes are static: they come from `example_inputs` (real or fake tensors); dynamo recompiles for
    other shapes, and each new graph comes through here again.
    """
    if isinstance(fn, torch.fx.GraphModule):
        gm = inline_vmaps(fn)  # torch's CPU associative_scan maps its combine function with vmap

        def fn(*args):
            with torch.fx.traceback.preserve_node_meta():
                return torch.fx.Interpreter(gm).run(*args)

    # A shape env only for data-dependent values: `.item()` captured by dynamo (packed sequences sliced by
    # cu_seqlens) becomes an unbacked symbol; the inputs' shapes stay static.
    mode = FakeTensorMode(allow_non_fake_inputs=False, shape_env=ShapeEnv())
    # Leave dynamo's tracing context (and its symbolic shape env) behind: we want concrete shapes.
    with torch._guards.tracing(None):
        fake_inputs = to_fake(example_inputs, mode)
        with mode:
            out = make_fx(fn, pre_dispatch=True)(*fake_inputs)
    out.meta["fake_mode"] = mode
    return out


def capture_graphs(model: Callable, args: Sequence[object] = (), kwargs: dict | None = None) -> list:
    """Every ATen graph dynamo produces for `model(*args, **kwargs)`, not rewritten (for tests, explain).

    Returns a list of (graph, example_inputs) pairs, one per dynamo graph (graph breaks give several).
    """
    graphs: list = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        graphs.append((aten_graph(gm, example_inputs), list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        compiled(*args, **(kwargs or {}))
    torch._dynamo.reset()
    return graphs


# the module's own name in dynamo's source: `self`, or `args[0]` when a decorator's `wrapper(*args)` (Hugging
# Face's output-capturing wrappers) received it; a module path in nn_module_stack starts at a module
_DYNAMO_ROOT = re.compile(r"^L\['(self|s|model|mod|m|fn)'\]\.?|^L\['args'\]\[0\]\.?")


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = _DYNAMO_ROOT.sub("", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    path = re.sub(r"getattr\(L\['\w+'\]\.?, '([^']+)'\)", r"\1", path)
    return path.strip(".")


def _source_line(node: torch.fx.Node) -> str:
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', trace)
    for path, line, _func, code in reversed(frames):
        if "/torch/" in path or "/fxfuse/" in path:
            continue
        code = code.strip()
        code = code if len(code) <= 90 else code[:89] + "…"  # the report shows it on a line of its own
        return f"{path.rsplit('/', 1)[-1]}:{line} `{code}`"
    return ""


def location(node: torch.fx.Node) -> str:
    """`module.path (file.py:123 `source line`)` for the report; falls back to the node name."""
    path, line = _module_path(node), _source_line(node)
    if path and line:
        return f"{path} ({line})"
    return path or line or node.name


# Runtime checks torch.export inserts (e.g. after `.to(dtype)`); they read a tensor without changing it,
# but a matcher sees them as one more use of an intermediate (softmax probabilities) and backs off.
_EXPORT_CHECKS = (torch.ops.aten._assert_tensor_metadata.default,)


def export_graph(
    model: torch.nn.Module, args: Sequence[object], dynamic_shapes: object = None
) -> torch.fx.GraphModule:
    """The front end for ONNX export: `torch.export` -> the canonical IR (ATen, FakeTensor `meta["val"]`,
    stack traces), with export's tensor-metadata assertions removed so the graph reads like a capture."""
    ep = torch.export.export(model, tuple(args), dynamic_shapes=dynamic_shapes, strict=False)
    gm = ep.module()
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _EXPORT_CHECKS and not node.users:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm
