"""Fold layout round trips: a chain of Transpose/Reshape/Squeeze/Unsqueeze that leaves every element where
it was in memory is one Reshape (a view in ONNX Runtime) instead of copies.

They appear around a fused attention read in ORT's [B, N, H*D] layout: the model's own transposes (to
heads-first and back) and the ones the lowering adds cancel, but a Reshape between them hides that from
ORT's transpose optimizer. Shapes come from the exported value_info, so only static chains are folded.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

_LAYOUT = ("Transpose", "Reshape", "Squeeze", "Unsqueeze")


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(d.dim_value for d in dims)
    return shapes


def _moves_nothing(chain: list[onnx.NodeProto], shapes: dict) -> bool:
    """True when applying the chain to an index tensor gives the indices back in memory order."""
    source = chain[0].input[0]
    if source not in shapes or any(n.output[0] not in shapes for n in chain):
        return False
    x = np.arange(int(np.prod(shapes[source]))).reshape(shapes[source])
    for node in chain:
        if node.op_type == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            x = x.transpose(perm) if perm else x.T
        x = x.reshape(shapes[node.output[0]])
    return bool((x.ravel() == np.arange(x.size)).all())


def fold_layout_round_trips(model: onnx.ModelProto) -> int:
    """Replace each data-preserving chain of layout ops (two or more, or one Transpose) by one Reshape,
    or by nothing when the shape comes back; returns how many chains were folded."""
    graph = model.graph
    shapes = _shapes(model)
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    producer = {out: node for node in graph.node for out in node.output}
    folded, removed = 0, set()
    for end in list(graph.node)[::-1]:
        if end.op_type not in _LAYOUT or id(end) in removed:
            continue
        chain = [end]
        while True:
            prev = producer.get(chain[0].input[0])
            link = chain[0].input[0]
            if prev is None or prev.op_type not in _LAYOUT or consumers.get(link, 0) != 1 or link in outputs:
                break
            chain.insert(0, prev)
        for start in range(len(chain)):
            sub = chain[start:]
            if (len(sub) > 1 or sub[0].op_type == "Transpose") and _moves_nothing(sub, shapes):
                _replace(graph, sub, shapes, outputs)
                removed.update(id(n) for n in sub)
                folded += 1
                break
    return folded


def _replace(graph: onnx.GraphProto, chain: list[onnx.NodeProto], shapes: dict, outputs: set[str]) -> None:
    """One Reshape for the chain, or nothing at all when it ends in the shape it started from."""
    source, result = chain[0].input[0], chain[-1].output[0]
    if shapes[source] == shapes[result] and result not in outputs:
        for node in graph.node:
            node.input[:] = [source if name == result else name for name in node.input]
    else:
        target = f"{result}_fxfuse_shape"
        graph.initializer.append(numpy_helper.from_array(np.array(shapes[result], np.int64), target))
        reshape = helper.make_node("Reshape", [source, target], [result], name=f"{chain[-1].name}_folded")
        graph.node.insert(list(graph.node).index(chain[-1]), reshape)
    for node in chain:
        graph.node.remove(node)
