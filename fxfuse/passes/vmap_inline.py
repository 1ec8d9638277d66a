"""Inline elementwise `torch.vmap` regions of a dynamo graph before the ATen re-trace.

Dynamo records a `torch.vmap` call as predispatch markers around the mapped function's ops:
`_vmap_increment_nesting`, `_add_batch_dim(x, in_dim, level)` per input, the ops on the per-sample values,
`_remove_batch_dim(y, level, size, out_dim)` per output, `_vmap_decrement_nesting`. Re-traced by
`make_fx`, the batched values lose their proxies and the region turns into baked constants. torch's
CPU `associative_scan` (combine_mode="generic") maps its combine function this way at every level of
its sweep.

When every input is batched along dim 0 with the region's size, all per-sample values have one rank,
and the ops are elementwise, the mapped function applied to the whole tensors computes the same numbers
(broadcasting right-aligns the per-sample dims either way): the markers are dropped and the ops read the
whole tensors. Any other region is left as dynamo captured it.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch.fx import Node

try:  # where dynamo records vmap this way (torch 2.9 on); elsewhere there is nothing to inline
    from torch._functorch import predispatch as _PRE

    _ENTER, _LEAVE = _PRE._vmap_increment_nesting, _PRE._vmap_decrement_nesting
    _ADD, _REMOVE = _PRE._add_batch_dim, _PRE._remove_batch_dim
    _LAZY = _PRE.lazy_load_decompositions
except (ImportError, AttributeError):  # pragma: no cover
    _ENTER = _LEAVE = _ADD = _REMOVE = _LAZY = object()
_ELEMENTWISE = {
    operator.mul, operator.add, operator.sub, operator.truediv, operator.neg,
    torch.mul, torch.add, torch.sub, torch.div, torch.neg, torch.exp, torch.tanh, torch.sigmoid, torch.abs,
    torch.nn.functional.silu, torch.nn.functional.softplus, torch.log, torch.sqrt, torch.maximum, torch.minimum,
}  # fmt: skip


def _region(enter: Node) -> list[Node] | None:
    """The nodes from `enter` to its `_vmap_decrement_nesting`, or None when the region is not one
    that inlining keeps exact."""
    if len(enter.args) < 1 or not isinstance(enter.args[0], int) or enter.users:
        return None
    size, nodes, batched, ranks = enter.args[0], [], set(), set()
    node = enter.next
    while node.op != "output":
        if node.op == "call_function" and node.target is _LEAVE:
            return [enter, *nodes, node] if len(ranks) == 1 and not node.users else None
        if node.op != "call_function" or node.target is _ENTER:
            return None
        if node.target is _ADD:
            x = node.args[0]
            val = x.meta.get("example_value") if isinstance(x, Node) else None
            if node.args[1] != 0 or not isinstance(val, torch.Tensor) or val.dim() == 0 or val.shape[0] != size:
                return None
            batched.add(node)
            ranks.add(val.dim())
        elif node.target is _REMOVE:
            if node.args[0] not in batched or node.args[2] != size or node.args[3] != 0:
                return None
        elif node.target is _LAZY:
            if node.users:
                return None
        elif node.target in _ELEMENTWISE and not node.kwargs:
            tensors = [a for a in node.args if isinstance(a, Node)]
            if not tensors or any(a not in batched for a in tensors):
                return None  # an unbatched tensor may broadcast differently against whole tensors
            if any(not isinstance(a, (Node, int, float)) for a in node.args):
                return None
            batched.add(node)
        else:
            return None
        nodes.append(node)
        node = node.next
    return None


def inline_vmaps(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """`gm` with its elementwise vmap regions inlined (a new GraphModule sharing gm's attributes), or gm
    itself when it has none."""
    if not any(n.op == "call_function" and n.target is _ENTER for n in gm.graph.nodes):
        return gm
    graph = torch.fx.Graph()
    env: dict[Node, Node] = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    regions = [r for n in list(graph.nodes) if n.op == "call_function" and n.target is _ENTER
               for r in [_region(n)] if r is not None]  # fmt: skip
    if not regions:
        return gm
    for region in regions:
        for node in region:
            if node.target in (_ADD, _REMOVE):
                node.replace_all_uses_with(node.args[0])
        for node in reversed(region):
            if node.target in (_ENTER, _LEAVE, _LAZY, _ADD, _REMOVE):
                graph.erase_node(node)
    graph.lint()
    return torch.fx.GraphModule(gm, graph)
