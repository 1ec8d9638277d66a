"""fused_nodes=True: each fused op becomes one `fxfuse`-domain node whose body is an ONNX local function.

The torch.onnx exporter tags every ONNX node with the FX node it came from (metadata
`pkg.torch.onnx.fx_node`), so the standard-op nodes a translation produced are found by that tag and
moved into a function. Runtimes that know nothing about fxfuse inline the function and run it as is.
"""

from __future__ import annotations

import onnx
from onnx import helper

from fxfuse.onnx.lowering import LoweredSite

DOMAIN = "fxfuse"
_FX_NODE = "pkg.torch.onnx.fx_node"


def _fx_node(node: onnx.NodeProto) -> str:
    for prop in node.metadata_props:
        if prop.key == _FX_NODE:
            return prop.value
    return ""


def _outer_names(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (a Scan or Loop body) read from the enclosing scope: they must become inputs
    of the function too, since a function body sees nothing but its inputs."""
    names: set[str] = set()
    for attr in node.attribute:
        for graph in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            defined = {x.name for x in graph.input} | {x.name for x in graph.initializer}
            defined |= {out for n in graph.node for out in n.output}
            used = {x for n in graph.node for x in (*n.input, *_outer_names(n))} | {o.name for o in graph.output}
            names |= used - defined - {""}
    return names


def _wrap_one(model: onnx.ModelProto, site: LoweredSite, tag: str, index: int) -> bool:
    graph = model.graph
    positions = [i for i, n in enumerate(graph.node) if _fx_node(n) == tag]
    if not positions:
        return False
    group = [graph.node[i] for i in positions]
    produced = {out for n in group for out in n.output if out}
    read = (x for n in group for x in (*n.input, *sorted(_outer_names(n))))
    inputs = list(dict.fromkeys(x for x in read if x and x not in produced))
    in_group = set(map(id, group))
    used_outside = {x for n in graph.node if id(n) not in in_group for x in n.input}
    used_outside |= {o.name for o in graph.output}
    outputs = [out for n in group for out in n.output if out in used_outside]
    opsets = [op for op in model.opset_import if op.domain in ("", "ai.onnx")]
    name = f"{site.op}_{index}"  # one body per site: sizes, masks and scales are baked into it
    body = [onnx.NodeProto() for _ in group]
    for copy, node in zip(body, group):
        copy.CopyFrom(node)
    function = helper.make_function(DOMAIN, name, inputs, outputs, body, opsets)
    call = helper.make_node(name, inputs, outputs, name=f"fxfuse_{site.node}", domain=DOMAIN)
    call.metadata_props.extend(group[0].metadata_props)
    for i in reversed(positions):
        del graph.node[i]
    # where the group's last node was: every input is produced before it (the checker confirms the order)
    graph.node.insert(positions[-1] - len(positions) + 1, call)
    internal = produced - set(outputs)
    kept = [vi for vi in graph.value_info if vi.name not in internal]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    model.functions.append(function)
    return True


def wrap_fused_nodes(model: onnx.ModelProto, sites: list[LoweredSite]) -> list[str]:
    """Turn each site's nodes into one call of an `fxfuse` local function; returns notes on sites left as
    plain nodes (a translation whose nodes the exporter did not tag)."""
    # FX node names change across re-export and decomposition; the fused ops' order does not
    tags = list(dict.fromkeys(t for n in model.graph.node if "torch.ops.fxfuse." in (t := _fx_node(n))))
    notes = []
    if len(tags) != len(sites):
        return [f"found {len(tags)} tagged fused op(s) for {len(sites)} site(s); left as standard nodes"]
    for i, (site, tag) in enumerate(zip(sites, tags)):
        if not _wrap_one(model, site, tag, i):
            notes.append(
                f"{site.op} at {site.location}: its ONNX nodes were not found; left as standard nodes"
            )
    if any(f.domain == DOMAIN for f in model.functions) and not any(
        o.domain == DOMAIN for o in model.opset_import
    ):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return notes
