"""The driver: run each pattern family's matcher, verify every candidate, splice the verified ones in.

A pass here has the torch.fx shape `GraphModule -> PassResult`; what it did goes to a list of `Rewrite`s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch._guards
from torch.fx import Graph, GraphModule, Node
from torch.fx.experimental.symbolic_shapes import optimization_hint

from fxfuse import families
from fxfuse.passes.buffer_values import BAKED_KEY
from fxfuse.passes.capture import location
from fxfuse.passes.site import Rejection, Site
from fxfuse.passes.verify import (
    Comparison,
    compare,
    float64_copy,
    judge,
    random_like,
    run_cases,
    tolerance,
    widen,
    without_dropout,
)
from fxfuse.report import Rewrite

META_KEY = "fxfuse"  # our namespace in node.meta
# gm.meta key: per placeholder, whether the captured graph differentiates it (set by `rewrite_patterns`)
REQUIRES_GRAD = "fxfuse_requires_grad"


def finder(pattern: str) -> Callable:
    """The matcher of one pattern family (imported on first use; families live in `fxfuse.families`)."""
    return families.load(families.family(pattern).finder)


def _is_mutating(node: Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def _is_subgraph(node: Node) -> bool:
    """A get_attr of a higher-order op's body (an associative_scan's combine): copied with the region."""
    return isinstance(getattr(node.graph.owning_module, str(node.target), None), GraphModule)


def region_of(site: Site) -> list[Node] | str:
    """Nodes computed between `site.inputs` and `site.output`, in graph order, or why the site is unsound."""
    inputs = set(site.inputs)
    seen: set[Node] = set()
    stack = [site.output]
    while stack:
        node = stack.pop()
        if node in seen or node in inputs or isinstance(node.meta.get("val"), torch.SymInt):
            continue  # sizes (symbolic under torch.export's dynamic_shapes) are numbers the region reads
        if node.op == "placeholder" or (node.op == "get_attr" and not _is_subgraph(node)):
            return f"the region reads {node.name}, which the match does not account for"
        if _is_mutating(node):
            return f"the region contains the in-place op {node.target}"
        seen.add(node)
        stack.extend(node.all_input_nodes)
    seen.update(n for n in site.extra_region if n not in inputs)
    for node in seen:
        if node is site.output or node in site.extra_outputs:
            continue
        outside = [u for u in node.users if u not in seen]
        if outside:
            return f"intermediate {node.name} is also used by {outside[0].name} outside the pattern"
    order = {n: i for i, n in enumerate(site.output.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def extract(gm: GraphModule, site: Site, region: list[Node]) -> tuple[GraphModule, GraphModule]:
    """Two standalone graphs over the site's inputs: the original region, and what `emit` builds."""
    graph, env = Graph(), {}
    for i, node in enumerate(site.inputs):
        env[node] = graph.placeholder(f"input_{i}")
        env[node].meta = dict(node.meta)
    # a symbolic size read by the region takes the example's value, the size verification runs at
    size = lambda n: env[n] if n in env else optimization_hint(n.meta["val"])  # noqa: E731
    for node in region:
        env[node] = graph.node_copy(node, size)
    outputs = [site.output, *site.extra_outputs]
    graph.output(env[site.output] if len(outputs) == 1 else tuple(env[n] for n in outputs))
    fused_graph = Graph()
    placeholders = [fused_graph.placeholder(f"input_{i}") for i in range(len(site.inputs))]
    fused = site.emit(fused_graph, placeholders)
    fused_graph.output(fused if len(outputs) == 1 else tuple(fused))
    return GraphModule(gm, graph), GraphModule(gm, fused_graph)


def differentiated(gm: GraphModule) -> set[Node]:
    """Nodes the captured graph differentiates: those computed, with a floating result, from a placeholder
    marked in `gm.meta[REQUIRES_GRAD]` (FakeTensor metadata does not keep `requires_grad`)."""
    flags = gm.meta.get(REQUIRES_GRAD) or ()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    marked = {n for n, f in zip(placeholders, flags) if f}
    for node in gm.graph.nodes:
        if node.op != "call_function" or not any(a in marked for a in node.all_input_nodes):
            continue
        val = node.meta.get("val")
        discrete = isinstance(val, torch.Tensor) and not (val.is_floating_point() or val.is_complex())
        if not discrete and "detach" not in str(node.target):
            marked.add(node)
    return marked


def verify_site(gm: GraphModule, site: Site, region: list[Node]) -> Comparison:
    """Run the extracted region and the fused op on random inputs (see `verify.run_cases`); the region's
    backward too when the captured graph differentiates one of the site's inputs."""
    vals = [n.meta.get("val") for n in site.inputs]
    if not all(isinstance(v, torch.Tensor) for v in vals):
        return Comparison(False, float("inf"), "an input has no tensor metadata")
    # symbolic sizes (torch.export with dynamic_shapes) are verified at the example input's sizes
    vals = [
        v
        if all(isinstance(s, int) for s in v.shape)
        else torch.empty([optimization_hint(s) for s in v.shape], dtype=v.dtype, device=v.device)
        for v in vals
    ]
    out_val = site.output.meta.get("val")
    rtol = tolerance(out_val.dtype if isinstance(out_val, torch.Tensor) else torch.float32, site.tolerance)
    grads = differentiated(gm)

    def make_inputs(case: str, seed: int) -> list[torch.Tensor]:
        made = []
        for i, val in enumerate(vals):
            x = site.input_gen(i, val, case, seed) if site.input_gen else None
            made.append(random_like(val, case, seed + 97 * i) if x is None else x)
        return made

    original, fused = extract(gm, site, region)
    needs_grad = [n in grads for n in site.inputs]
    with without_dropout(original, fused):
        return run_cases(original, fused, make_inputs, rtol, truth=float64_copy(original), grad_inputs=needs_grad,
                         names=[n.name for n in site.inputs])  # fmt: skip


def _fake_mode(gm: GraphModule):
    mode = gm.meta.get("fake_mode")
    if mode is None:
        vals = [n.meta.get("val") for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
        mode = torch._guards.detect_fake_mode(vals)
    return mode


def propagate_meta(gm: GraphModule, nodes: list[Node], provenance: Node, tag: dict) -> None:
    """Give emitted nodes FakeTensor values (so later passes can reason about them) and the anchor's
    provenance (module stack, source line) so the report and later tools can point at the user's code."""
    mode = _fake_mode(gm)
    for node in nodes:
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
            if key in provenance.meta:
                node.meta[key] = provenance.meta[key]
        node.meta[META_KEY] = dict(tag)
        if node.op != "call_function" or mode is None:
            continue
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
        with mode:
            node.meta["val"] = node.target(*args, **kwargs)


def apply_site(gm: GraphModule, site: Site, region: list[Node]) -> Node:
    graph = gm.graph
    before = set(graph.nodes)
    order = {n: i for i, n in enumerate(graph.nodes)}
    inside = set(region)
    # before the first reader of any output: an extra output (a final state) may be read before `output`
    readers = [u for n in site.extra_outputs for u in n.users if u not in inside]
    with graph.inserting_before(min([site.output, *readers], key=order.__getitem__)):
        new = site.emit(graph, list(site.inputs))
    emitted = [n for n in graph.nodes if n not in before]
    propagate_meta(gm, emitted, site.anchor, {"pattern": site.pattern, "variant": site.variant})
    news = new if isinstance(new, (list, tuple)) else [new]
    for old, replacement in zip([site.output, *site.extra_outputs], news, strict=True):
        old.replace_all_uses_with(replacement)
    new = news[0]
    for node in reversed(region):
        if not node.users:
            graph.erase_node(node)
    for node in site.inputs:
        _erase_if_dead(node)  # a folded constant (a causal mask built in forward) that only the region read
    return new


def _erase_if_dead(node: Node) -> None:
    """Erase `node` and, in turn, its inputs when nothing uses them and they are pure, non-random ops."""
    seeded = isinstance(node.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in node.target.tags
    if node.op != "call_function" or node.users or node.is_impure() or seeded or getattr(node, "_erased", False):
        return
    inputs = node.all_input_nodes
    node.graph.erase_node(node)
    for x in inputs:
        _erase_if_dead(x)


def _stale(site: Site, graph: Graph) -> bool:
    nodes = [site.output, site.anchor, *site.inputs, *site.extra_outputs]
    return any(getattr(n, "_erased", False) or n.graph is not graph for n in nodes)


def rewrite_patterns(
    gm: GraphModule,
    patterns: Sequence[str] | None,
    backend: str,
    verify: bool = True,
    requires_grad: Sequence[bool] | None = None,
) -> tuple[GraphModule, list[Rewrite], list[str]]:
    """Canonicalize `gm`, then find, verify and apply every pattern family's sites (mutated in place).

    `gm` is any ATen-level graph with FakeTensor `meta["val"]`: from `capture.aten_graph` (optimize,
    torch.compile) or from `torch.export` (ONNX export). `requires_grad[i]` says the graph will be
    differentiated with respect to its i-th input (training): sites reached from one get their backward
    verified too."""
    from fxfuse.passes.canonicalize import canonicalize

    gm = canonicalize(gm).graph_module
    gm.meta[REQUIRES_GRAD] = list(requires_grad or ())
    rewrites: list[Rewrite] = []
    notes: list[str] = []
    for pattern in families.names() if patterns is None else patterns:
        try:
            sites = finder(pattern)(gm, backend)
        except Exception as exc:  # one family's bug must not stop the others, nor the model
            notes.append(f"{pattern} matcher failed ({type(exc).__name__}: {exc}); no {pattern} rewrites")
            continue
        for site in sites:
            loc = location(site.anchor)
            if isinstance(site, Rejection):
                rewrites.append(Rewrite(site.pattern, site.variant, loc, "rejected", site.reason))
                continue
            record = Rewrite(site.pattern, site.variant, loc, "rejected", backend=site.backend)
            rewrites.append(record)
            if _stale(site, gm.graph):
                record.reason = "overlaps a rewrite applied just before"
                continue
            region = region_of(site)
            if isinstance(region, str):
                record.reason = region
                continue
            if verify:
                check = verify_site(gm, site, region)
                record.max_rel_err = None if check.max_rel_err == float("inf") else check.max_rel_err
                record.original_rel_err, record.tolerance = check.original_rel_err, check.tolerance
                if not check.ok:
                    record.reason = f"failed verification: {check.reason}"
                    continue
                record.reason = check.note
            else:
                record.reason = "not verified (verify=False)"
            apply_site(gm, site, region)
            record.status = "applied"
            if site.reads_buffers:
                placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
                gm.meta.setdefault(BAKED_KEY, []).extend(placeholders.index(n) for n in site.reads_buffers)
    gm.graph.lint()
    gm.recompile()
    return gm, rewrites, notes


def check_whole_graph(
    original: Callable, rewritten: Callable, example_inputs: Sequence[object], rtol: float | None = None
) -> Comparison:
    """Run the graph as captured and the rewritten one on (clones of) the real example inputs; in-place
    ops such as batch-norm statistics updates then touch the clones, not the user's buffers. The outputs
    and the inputs after the run (a buffer updated in place) are compared. Where they disagree by more
    than `rtol`, a float64 run of the captured graph decides, as in `verify.judge`."""
    clone = lambda xs: [x.detach().clone() if isinstance(x, torch.Tensor) else x for x in xs]
    tensors = lambda xs: [x for x in xs if isinstance(x, torch.Tensor)]
    # Same seed on both sides for random ops the rewrites did not touch; dropout off.
    with torch.no_grad(), without_dropout(original, rewritten), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        inputs = clone(example_inputs)
        want = (original(*inputs), tensors(inputs))
        torch.manual_seed(0)
        inputs = clone(example_inputs)
        got = (rewritten(*inputs), tensors(inputs))
        dtypes = [w.dtype for w in torch.utils._pytree.tree_leaves(want) if isinstance(w, torch.Tensor)]
        low = any(d in (torch.float16, torch.bfloat16) for d in dtypes)
        # Rewrites compose: allow the sum of per-site tolerances' order of magnitude, not more.
        rtol = rtol or (2e-2 if low else 1e-4)
        check = compare(got, want, rtol)
        if check.ok or check.max_rel_err == float("inf") or not isinstance(original, GraphModule):
            return check
        try:
            torch.manual_seed(0)
            wide = [widen(x) for x in clone(example_inputs)]
            truth = (float64_copy(original)(*wide), tensors(wide))
        except Exception:
            return check  # no float64 run (an op without a double kernel): agreement decides
    return judge(got, want, truth, rtol)
