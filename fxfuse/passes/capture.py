"""Capture: any dynamo graph -> the canonical IR, a static-shaped ATen FX graph with FakeTensor `meta["val"]`.

TorchDynamo is the front end (it handles Python control flow, unrolls loops and breaks graphs on what it
cannot trace). Each dynamo graph is re-traced here with `make_fx(pre_dispatch=True)`: ops come out at
the ATen level *before* autograd (`aten.linear`, `aten.softmax.int`, `aten.max_pool2d`), so the returned
graph still trains when run eagerly, and every node carries its FakeTensor value. Re-running the dynamo
graph through an Interpreter under `preserve_node_meta` keeps each node's `stack_trace` and
`nn_module_stack`, which the report uses to point at the user's line.

A loop over time that dynamo unrolled is most of the re-trace's work (L copies of one step, each op run
again on FakeTensors). `Retrace` traces its first `REAL_STEPS` steps and copies the ATen nodes of the
last of them for the others (see `_Replicas`), when the dynamo graph shows L isomorphic steps.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch._guards
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import Node
from torch.fx.experimental.proxy_tensor import get_proxy_mode, get_proxy_slot, make_fx, track_tensor_tree
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import _disable_current_modes

from fxfuse.passes.reroll import NotALoop, unrolled_steps
from fxfuse.passes.vmap_inline import inline_vmaps


def to_fake(values: Sequence[object], mode: FakeTensorMode) -> list[object]:
    return [mode.from_tensor(v, static_shapes=True) if isinstance(v, torch.Tensor) else v for v in values]


def aten_graph(
    fn: torch.fx.GraphModule | Callable, example_inputs: Sequence[object], copy_loops: bool = True
) -> torch.fx.GraphModule:
    """Re-trace `fn` (a dynamo GraphModule or any callable of tensors) into the canonical ATen graph.

    Shapes are static: they come from `example_inputs` (real or fake tensors); dynamo recompiles for
    other shapes, and each new graph comes through here again. `copy_loops` lets the re-trace copy the
    ATen nodes of an unrolled loop's later steps (`Retrace`) instead of tracing each; `optimize` turns it
    off with verify=False, where no whole-graph check would compare the result with dynamo's graph.
    """
    if isinstance(fn, torch.fx.GraphModule):
        gm = inline_vmaps(fn)  # torch's CPU associative_scan maps its combine function with vmap
        plan = _plan_or_none(gm) if copy_loops else {}

        def trace(plan: dict) -> torch.fx.GraphModule:
            retrace = Retrace(gm, plan)

            def fn(*args):
                with torch.fx.traceback.preserve_node_meta():
                    return retrace.run(*args)

            out = _trace(fn, example_inputs)
            out.meta[COPIED] = retrace.copied
            return out

        if plan:
            try:
                return trace(plan)
            except Exception:  # copying is only a shortcut: whatever it trips on, trace step by step
                pass
        return trace({})
    return _trace(fn, example_inputs)


def _trace(fn: Callable, example_inputs: Sequence[object]) -> torch.fx.GraphModule:
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


def _plan_or_none(gm: torch.fx.GraphModule) -> dict:
    try:
        return unrolled_loops(gm)
    except Exception:  # an unusual graph (data-dependent sizes compared, tensor constants): no copies
        return {}


# Loops of at least MIN_STEPS steps are replicated; steps 0 .. REAL_STEPS - 1 are traced, the last three of
# them must give the same recipe (ATen nodes, their arguments; integers may move by one stride per step).
MIN_STEPS = 8
REAL_STEPS = 5
COPIED = "fxfuse_copied_nodes"  # gm.meta: how many dynamo nodes `aten_graph` copied rather than traced
TORCH_STACKS = (torch.stack, torch.cat, torch.concat, torch.concatenate)


class _NoReplica(Exception):
    """The traced steps do not show one recipe: the loop is traced step by step."""


@dataclass
class _Unrolled:
    """One unrolled loop of the dynamo graph: `bodies[i]` are step i's nodes (i >= 1), isomorphic."""

    bodies: list[list[Node]]
    positions: list[dict[Node, int]]


def _same_value(a: object, b: object) -> bool:
    """Whether two dynamo example values are tensors of one shape, stride, dtype, device, grad flag."""
    return (
        isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
        and a.stride() == b.stride() and a.dtype == b.dtype and a.device == b.device
        and a.requires_grad == b.requires_grad and not a.is_sparse and a.layout == torch.strided
    )  # fmt: skip


def _writes(node: Node) -> bool:
    """Whether a dynamo graph node may write a tensor in place (an `_`-suffixed method or function,
    `operator.setitem`, `out=`)."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    in_place = name.endswith("_") and not name.endswith("__")
    return in_place or name in ("setitem", "__setitem__") or "out" in node.kwargs


def unrolled_loops(gm: torch.fx.GraphModule) -> dict[Node, tuple[_Unrolled, int, int]]:
    """Nodes of the dynamo graph that `Retrace` may copy instead of tracing: node -> (loop, step, position),
    for steps >= REAL_STEPS of every loop of >= MIN_STEPS isomorphic steps (see `reroll.unrolled_steps`)
    whose nodes all compute one tensor, of the same metadata at every step, by a call (no in-place write:
    `operator.setitem` computes no tensor), and whose time indices keep one sign over the copied steps."""
    plan: dict[Node, tuple[_Unrolled, int, int]] = {}
    for anchor in gm.graph.nodes:
        if anchor.op != "call_function" or anchor.target not in TORCH_STACKS:
            continue
        try:
            _outputs, bodies, slots = unrolled_steps(anchor, TORCH_STACKS)
        except NotALoop:
            continue
        if len(bodies) < max(MIN_STEPS, REAL_STEPS + 1) or any(n in plan for n in bodies[1]):
            continue
        template = bodies[REAL_STEPS - 1]
        if any(n.op not in ("call_function", "call_method") for n in template):
            continue
        if any(_writes(m) for n in template for m in (n, *n.users)):
            continue  # an in-place op in a step or on a step's value (h.add_(x), ys[t] = h): traced as written
        metas = [n.meta.get("example_value") for n in template]
        if not all(
            _same_value(n.meta.get("example_value"), m) for body in bodies[1:] for n, m in zip(body, metas)
        ):
            continue
        times = [s.value for s in slots.values() if s.kind == "time"]
        last = len(bodies) - 1  # value at step i: at_one + (i - 1) * stride
        if any((at_one + (REAL_STEPS - 3) * stride < 0) != (at_one + (last - 1) * stride < 0)
               for stride, at_one in times):  # fmt: skip
            continue  # an index that changes sign (x[:, t - 5]) may be normalized differently below 0
        loop = _Unrolled(bodies, [{n: j for j, n in enumerate(b)} for b in bodies])
        for step in range(REAL_STEPS, len(bodies)):
            for j, n in enumerate(bodies[step]):
                plan[n] = (loop, step, j)
    return plan


class _Pending:
    """The value of a copied node that only other copied nodes read (never handed to an op)."""


class Retrace(torch.fx.Interpreter):
    """Runs a dynamo graph under `make_fx`, copying the ATen nodes of the steps `unrolled_loops` finds.

    A copied step's ATen nodes are those its template (step REAL_STEPS - 1) traced to, in the same order,
    with: a node the template traced -> its copy; the ATen value of an input of the template's torch node ->
    that of the same input at this step (same position in this step, or in the previous one: the carried
    state); a loop invariant -> itself; an integer that moved by one stride over the last three traced
    steps (a time index) -> continued. Each copy keeps its template's metadata (`val` included: the same
    shapes, checked at the torch level); a value read by a traced node gets a FakeTensor of its own."""

    def __init__(self, gm: torch.fx.GraphModule, plan: dict[Node, tuple[_Unrolled, int, int]]) -> None:
        super().__init__(gm)
        self.plan = plan  # from `unrolled_loops(gm)`; {}: every node traced
        self.copied = 0
        window = {REAL_STEPS - 3, REAL_STEPS - 2, REAL_STEPS - 1}
        self.window = {n for loop, _s, _j in self.plan.values() for k in window for n in loop.bodies[k]}
        self.created: dict[Node, list[Node]] = {}  # window node -> the ATen nodes its trace created
        self.aten: dict[Node, Node] = {}  # torch node -> the ATen node of its value
        self.origin: dict[Node, Node] = {}  # ATen node -> the torch node it was the value of, last
        self.aliased: dict[Node, list[Node]] = {}  # window node -> its inputs whose very tensor it returned
        self.produced: dict[Node, Node] = {}  # window node -> the ATen node of its value when it ran
        self.recipes: dict[tuple[int, int], object] = {}  # (id(loop), position) -> recipe, or None
        self.fallback: set[int] = set()  # id(loop) of loops traced in full after all
        self.users_outside = {n for n in self.plan if any(u not in self.plan for u in n.users)}

    def run_node(self, n: Node) -> object:
        if not self.plan:  # no loop to copy: a plain re-trace
            return super().run_node(n)
        tracer = get_proxy_mode().tracer
        entry = self.plan.get(n)
        if entry is not None and id(entry[0]) not in self.fallback:
            try:
                return self._replicate(n, *entry, tracer)
            except _NoReplica:
                loop = entry[0]
                self.fallback.add(id(loop))
                # the steps before this one were copied (or none were); later ones are traced, reading
                # the copies through FakeTensors of their own
                for step in range(REAL_STEPS, entry[1] + 1):
                    for m in loop.bodies[step]:
                        if m in self.aten and not isinstance(self.env.get(m), torch.Tensor) and m in self.env:
                            self.env[m] = self._materialize(m, tracer)
        graph = tracer.graph
        last = next(iter(reversed(graph.nodes)))
        value = super().run_node(n)
        if n in self.window:
            created, node = [], last.next
            while node.op != "root":
                created.append(node)
                node = node.next
            self.created[n] = created
        if isinstance(value, torch.Tensor):
            slot = get_proxy_slot(value, tracer, None)
            if slot is not None:
                self.aten[n] = slot.proxy.node
                self.origin[slot.proxy.node] = n
                # an op that returned its input (`state.to(same dtype)`) re-tracks that tensor as its own node
                aliased = [x for x in n.all_input_nodes if self.env.get(x) is value]
                for x in aliased:
                    self.aten[x] = slot.proxy.node
                if n in self.window:
                    self.aliased[n], self.produced[n] = aliased, slot.proxy.node
        return value

    def _token(self, loop: _Unrolled, step: int, t: Node, a: object, created: dict[Node, int]) -> tuple:
        """What ATen argument `a` of step `step`'s torch node `t` is, independent of the step."""
        if not isinstance(a, Node):
            return ("const", a)
        if a in created:
            return ("internal", created[a])
        kinds = set()
        # the torch inputs whose value `a` is; else the torch node that computed `a` (an op that returns its
        # input, `state.to(same dtype)`, leaves the tensor traced as its own ATen node, read at the next step)
        sources = [x for x in t.all_input_nodes if self.aten.get(x) is a] or [self.origin.get(a)]
        for x in sources:
            if x is None:
                continue
            if x in loop.positions[step]:
                kinds.add(("body", loop.positions[step][x]))
            elif x in loop.positions[step - 1]:
                kinds.add(("carry", loop.positions[step - 1][x]))
            else:
                kinds.add(("inv", a))
        if len(kinds) > 1:
            raise _NoReplica(f"{a.name} stands for two inputs of {t.name}")
        return kinds.pop() if kinds else ("inv", a)

    def _steps_recipe(self, loop: _Unrolled, step: int, position: int) -> tuple:
        t = loop.bodies[step][position]
        if t not in self.created or t not in self.produced:
            raise _NoReplica(f"{t.name} was not traced to one ATen value")
        created = {a: i for i, a in enumerate(self.created[t])}
        nodes = []
        for a in self.created[t]:
            if a.op not in ("call_function", "get_attr"):
                raise _NoReplica(f"{t.name} traced to a {a.op} node")
            schema = getattr(a.target, "_schema", None)
            if schema is not None and schema.is_mutable:
                raise _NoReplica(f"{t.name} traced to the in-place {a.target}")
            leaves, spec = pytree.tree_flatten((a.args, a.kwargs))
            nodes.append((a.op, a.target, spec, [self._token(loop, step, t, v, created) for v in leaves], a))
        aliased = tuple(self._where(loop, step, x) for x in self.aliased.get(t, ()))
        return nodes, self._token(loop, step, t, self.produced[t], created), aliased

    @staticmethod
    def _where(loop: _Unrolled, step: int, x: Node) -> tuple:
        if x in loop.positions[step]:
            return ("body", loop.positions[step][x])
        if x in loop.positions[step - 1]:
            return ("carry", loop.positions[step - 1][x])
        return ("inv", x)

    def _recipe(self, loop: _Unrolled, position: int) -> tuple:
        """The template's recipe, with integers that move by one stride per step marked ("time", v, stride)."""
        key = (id(loop), position)
        if key not in self.recipes:
            self.recipes[key] = None
            r0, r1, r2 = (self._steps_recipe(loop, REAL_STEPS - k, position) for k in (3, 2, 1))
            if len(r0[0]) != len(r2[0]) or len(r1[0]) != len(r2[0]) or not r0[1:] == r1[1:] == r2[1:]:
                raise _NoReplica("the traced steps differ")
            nodes = []
            for n0, n1, n2 in zip(*(r[0] for r in (r0, r1, r2))):
                if n0[:3] != n2[:3] or n1[:3] != n2[:3] or not len(n0[3]) == len(n1[3]) == len(n2[3]):
                    raise _NoReplica("the traced steps differ")
                leaves = [self._leaf(*ts) for ts in zip(n0[3], n1[3], n2[3])]
                nodes.append((n2[0], n2[1], n2[2], leaves, n2[4]))
            self.recipes[key] = (nodes, r2[1], r2[2])
        if self.recipes[key] is None:
            raise _NoReplica("no recipe")
        return self.recipes[key]

    @staticmethod
    def _leaf(t0: tuple, t1: tuple, t2: tuple) -> tuple:
        if t0 == t1 == t2 and (t0[0] != "const" or type(t0[1]) is type(t1[1]) is type(t2[1])):
            return t2
        ints = t0[0] == t1[0] == t2[0] == "const" and all(type(t[1]) is int for t in (t0, t1, t2))
        if ints and t2[1] - t1[1] == t1[1] - t0[1] != 0:
            return ("time", t2[1], t2[1] - t1[1])
        raise _NoReplica(f"an argument differs between traced steps ({t0}, {t1}, {t2})")

    def _replicate(self, n: Node, loop: _Unrolled, step: int, position: int, tracer) -> object:
        nodes, out, aliased = self._recipe(loop, position)
        graph, copies = tracer.graph, []

        def resolve(token: tuple) -> object:
            kind = token[0]
            if kind == "internal":
                return copies[token[1]]
            if kind == "body":
                return self.aten[loop.bodies[step][token[1]]]
            if kind == "carry":
                return self.aten[loop.bodies[step - 1][token[1]]]
            if kind == "time":
                return token[1] + (step - (REAL_STEPS - 1)) * token[2]
            return token[1]  # "inv", "const"

        for op, target, spec, leaves, template in nodes:
            args, kwargs = pytree.tree_unflatten([resolve(t) for t in leaves], spec)
            copy = graph.create_node(op, target, tuple(args), dict(kwargs), name=re.sub(r"_\d+$", "", template.name))
            copy.meta = dict(template.meta)
            copies.append(copy)
        self.aten[n] = resolve(out)
        self.origin[self.aten[n]] = n
        for kind, x in aliased:  # as tracing does: the input tensor it returned is now this node
            x = loop.bodies[step][x] if kind == "body" else loop.bodies[step - 1][x] if kind == "carry" else x
            self.aten[x] = self.aten[n]
            if isinstance(self.env.get(x), torch.Tensor):  # its FakeTensor, handed out already, follows
                track_tensor_tree(self.env[x], torch.fx.Proxy(self.aten[n], tracer), constant=None, tracer=tracer)
        self.copied += 1
        if n in self.users_outside:
            return self._materialize(n, tracer)
        return _Pending()

    def _materialize(self, n: Node, tracer) -> torch.Tensor:
        """A FakeTensor for copied node `n`'s value, tracked as its ATen node (a traced node reads it)."""
        like = n.meta["example_value"]
        node = self.aten[n]
        mode = node.meta["val"].fake_mode
        with _disable_current_modes(), mode:
            fake = torch.empty_strided(like.shape, like.stride(), dtype=like.dtype, device=like.device)
        fake.requires_grad_(like.requires_grad)
        track_tensor_tree(fake, torch.fx.Proxy(node, tracer), constant=None, tracer=tracer)
        return fake


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
