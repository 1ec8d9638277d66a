"""Linear-attention sites: from what the matcher understood (roles, weights) to a `Site` whose `emit` builds
`fxfuse::linear_attention` with the layout ops around it, its report text and its verification inputs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import Graph, Node

from fxfuse.passes.attention_layout import Operand, apply_steps, layout_steps, peel_qkv, val
from fxfuse.passes.buffer_values import buffer_name
from fxfuse.passes.site import Site

aten = torch.ops.aten
PATTERN = "linear_attention"


def is_call(node: object, *targets) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def einsum_sides(node: Node) -> tuple[list[str], str] | None:
    """(operand subscripts, output subscripts) of an einsum node with `...` spelled out in fresh letters,
    right-aligned as einsum broadcasts them (the output's ellipsis is the widest operand's)."""
    eq = node.args[0].replace(" ", "")
    if "->" not in eq or any(val(t) is None for t in node.args[1]):
        return None
    lhs, out = eq.split("->")
    sides = lhs.split(",")
    if len(sides) != len(node.args[1]):
        return None
    fresh = "".join(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq)
    widths = [val(t).dim() - len(sd.replace("...", "")) if "..." in sd else 0 for sd, t in zip(sides, node.args[1])]
    if min(widths) < 0 or max(widths) > len(fresh):
        return None
    pool = fresh[: max(widths)]
    spell = lambda sd, w: sd.replace("...", pool[len(pool) - w :] if w else "")  # noqa: E731
    return [spell(sd, w) for sd, w in zip(sides, widths)], spell(out, len(pool))


@dataclass
class Roles:
    """q [batch, n, d], k [batch, m, d], v [batch, m, e] as labelled operands; out_labels the output's."""

    batch: str
    sizes: dict[str, int]
    q: Operand
    k: Operand
    v: Operand
    out_labels: str
    scores_labels: str  # the score product's output axes, as roles


@dataclass
class Weights:
    """What the score matrix goes through between the two products."""

    scale: float = 1.0
    causal: bool = False
    decay: list[float] | None = None
    normalize: str = "none"
    eps: float = 0.0
    constants: dict[Node, torch.Tensor] = field(default_factory=dict)  # inputs whose value is known
    buffers: list[Node] = field(default_factory=list)  # buffer placeholders those values were read from
    taylor: float | None = None  # the weights are 1 + s + s²/2 of s = taylor * (q . k) (a Taylor exp)
    squared: bool = False  # with taylor: the weights are s² alone (ReBased)


def feature_map(node: Node) -> str:
    """How q or k was made, for the report: "φ=elu+1", relu, relu², exp, softmax; "φ" when unknown."""
    if is_call(node, aten.add.Tensor) and node.args[1] == 1 and is_call(node.args[0], aten.elu.default):
        return "φ=elu+1"
    if is_call(node, aten.pow.Tensor_Scalar, aten.square.default) and is_call(node.args[0], aten.relu.default):
        return "φ=relu²"
    names = {aten.relu.default: "relu", aten.exp.default: "exp", aten.softmax.int: "softmax",
             aten._softmax.default: "softmax", aten.sigmoid.default: "sigmoid"}  # fmt: skip
    name = names.get(node.target) if node.op == "call_function" else None
    return f"φ={name}" if name else "φ"


def _input_gen(constants: dict[int, torch.Tensor], normalized: bool):
    """Verification inputs: known constants keep their value; when the weights are divided by their row
    sums, q and k are non-negative, as the feature maps that make such a model work keep them (elu+1,
    relu, exp, softmax): with signed q and k a row sum near 0 makes the original itself meaningless."""

    def gen(i: int, meta: torch.Tensor, case: str, seed: int) -> torch.Tensor | None:
        if i in constants:
            return constants[i].clone()
        if i > 1 or not normalized:
            return None
        g = torch.Generator().manual_seed(1000 * seed + i)
        x = torch.rand(tuple(meta.shape), generator=g, dtype=torch.float64) + 0.05
        return (x * (100.0 if case == "large" else 1.0)).to(meta.dtype).to(meta.device)

    return gen


def taylor_features(graph: Graph, x: Node, squared: bool = False) -> Node:
    """[..., D] -> [..., 1 + D + D²]: [1, x, vec(x x^T) / sqrt(2)], so phi(a) . phi(b) = 1 + a.b + (a.b)²/2;
    squared: [..., D²]: vec(x x^T), so phi(a) . phi(b) = (a.b)²."""
    outer = graph.call_function(
        aten.mul.Tensor,
        (graph.call_function(aten.unsqueeze.default, (x, -1)), graph.call_function(aten.unsqueeze.default, (x, -2))),
    )
    pairs = graph.call_function(aten.flatten.using_ints, (outer, -2, -1))
    if squared:
        return pairs
    one = graph.call_function(aten.ones_like.default, (graph.call_function(aten.slice.Tensor, (x, -1, 0, 1)),))
    pairs = graph.call_function(aten.mul.Tensor, (pairs, 0.5**0.5))
    return graph.call_function(aten.cat.default, ([one, x, pairs], -1))


def fname(w: Weights) -> str:
    """The expansion of the scores in the weights, for the report."""
    return "square s²" if w.squared else "taylor 1 + s + s²/2"


def build_site(anchor: Node, output: Node, roles: Roles, w: Weights, backend: str, form: str) -> Site | str:
    """The Site (inputs q, k, v and the folded constants; emit builds the op with its layout steps)."""
    from fxfuse.fusion.linear_attention import linear_attention_backend

    batch, sizes = roles.batch, roles.sizes
    q, k, v, kv_heads = peel_qkv(roles.q, roles.k, roles.v, batch, sizes)
    fold = kv_heads is not None
    if w.causal and sizes["n"] != sizes["m"]:
        return "a causal mask over queries and keys of different lengths"
    if w.decay is not None and len(w.decay) not in (1, sizes.get("h", 1)):
        return "the decay varies along another axis than the heads"
    lead, keep = 2 - len(batch), "h" if fold else ""
    plans = [layout_steps(q, batch + "nd", sizes, lead), layout_steps(k, batch + "md", sizes, lead, keep),
             layout_steps(v, batch + "me", sizes, lead, keep)]  # fmt: skip
    inputs = [q.node, k.node, v.node]
    if len(set(inputs)) != 3:
        return "q, k and v are not three different tensors"
    constants = {}
    for node, value in w.constants.items():
        if node not in inputs:
            inputs.append(node)  # folded constants still bound the region (a mask shared by layers)
            constants[len(inputs) - 1] = value
    out_steps = [(aten.squeeze.dims, (list(range(lead)),))] if lead else []
    if roles.out_labels != batch + "ne":
        out_steps.append((aten.permute.default, ([(batch + "ne").index(c) for c in roles.out_labels],)))
        if val(output).is_contiguous():
            out_steps.append((aten.contiguous.default, ()))
    scale = w.scale * q.scale * k.scale
    features = sizes["d"]
    if w.taylor is not None:
        # 1 + s + s²/2 = phi(c q) . phi(k) with phi(x) = [1, x, vec(x x^T) / sqrt(2)]: 1 + D + D² features;
        # s² = phi(c q) . phi(k) with phi(x) = vec(x x^T): D² features
        scale, inner = w.scale, w.taylor * q.scale * k.scale
        features = sizes["d"] ** 2 + (0 if w.squared else 1 + sizes["d"])
        if features >= sizes["m"]:
            spelled = "the s² features (d²" if w.squared else "the Taylor features (1 + d + d²"
            return f"{spelled} = {features}) outnumber the keys ({sizes['m']}): quadratic is cheaper"
    params = (scale, w.causal, w.decay, w.normalize, w.eps, backend)
    out_dtype, q_dtype = val(output).dtype, val(q.node).dtype

    def emit(graph: Graph, nodes: list[Node]) -> Node:
        import fxfuse.fusion.linear_attention  # noqa: F401  (registers torch.ops.fxfuse.linear_attention)

        qkv = [apply_steps(graph, nodes[i], plans[i]) for i in range(3)]
        if w.taylor is not None:
            qkv[0] = taylor_features(graph, graph.call_function(aten.mul.Tensor, (qkv[0], inner)), w.squared)
            qkv[1] = taylor_features(graph, qkv[1], w.squared)
        out = graph.call_function(torch.ops.fxfuse.linear_attention.default, (*qkv, *params))
        if v.scale != 1.0:  # a scale peeled off v passes through the product and any row normaliser
            out = graph.call_function(aten.mul.Tensor, (out, v.scale))
        out = apply_steps(graph, out, out_steps)
        if out_dtype != q_dtype:
            out = graph.call_function(aten._to_copy.default, (out,), {"dtype": out_dtype})
        return out

    norm = {"none": "no normaliser", "eps": f"row-sum + {w.eps:g}" if w.eps else "row-sum",
            "clamp": f"row-sum clamp(min={w.eps:g})"}  # fmt: skip
    fmap = f"φ={fname(w)}" if w.taylor is not None else feature_map(q.node)
    parts = [form, fmap, norm[w.normalize]]
    if w.decay is not None:
        parts.append("causal, decay " + "/".join(f"{g:.4g}" for g in w.decay))
    elif w.causal:
        parts.append("causal")
    if w.buffers:
        names = ", ".join(buffer_name(b) for b in w.buffers)
        parts.append(f"mask from buffer {names} (value checked per call)")
    if fold and kv_heads != sizes.get("h", 1):
        parts.append(f"gqa {sizes['h']}:{kv_heads}")
    name = linear_attention_backend(backend, val(q.node).device, q_dtype, features, sizes["e"])[0]
    gen = _input_gen(constants, w.normalize != "none")
    return Site(PATTERN, ", ".join(parts), anchor, output, inputs, emit, backend=name, tolerance=1e-4, input_gen=gen,
                reads_buffers=list(w.buffers))  # fmt: skip
