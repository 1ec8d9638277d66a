"""Attention layouts: the two products of attention as labelled contractions, and how each operand reaches
the fused op's [B, H, N, D].

Every product (matmul, bmm, einsum) is read as an einsum over single-letter axis labels. The score
product gives the roles: the key axis `m` (the softmax axis), the query axis `n`, the contracted head
dim `d` and the batch axes; the value product adds the value dim `e`. An operand is then a graph node,
its labels, and the steps (permute, unsqueeze, expand) that bring it to [batch..., N, D]. Before that,
`peel` walks up through ops the fused op absorbs: transposes and permutes (they only relabel axes),
scalar scales on q or k, and the repetition of kv heads (GQA/MQA).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace

import torch
from torch.fx import Graph, Node

aten = torch.ops.aten
Step = tuple[object, tuple]  # (aten op, args after the tensor)


def val(node: object) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, Node) else None
    return v if isinstance(v, torch.Tensor) else None


def shape(node: Node) -> tuple[int, ...]:
    return tuple(int(s) for s in val(node).shape)


@dataclass(frozen=True)
class Product:
    """`out = einsum(f"{a_labels},{b_labels}->{out_labels}", a, b)` for one matmul/bmm/einsum node."""

    node: Node
    a: Node
    b: Node
    a_labels: str
    b_labels: str
    out_labels: str
    bias: Node | None = None  # baddbmm's added tensor (nn.MultiheadAttention's mask, BLOOM's ALiBi)
    alpha: float = 1.0  # baddbmm's scale of the product


def read_product(node: Node) -> Product | None:
    """A matmul/bmm/einsum of two tensors as a labelled contraction, or None."""
    if node.op != "call_function":
        return None
    if node.target in (aten.matmul.default, aten.bmm.default) and len(node.args) == 2:
        a, b = node.args
        if val(a) is None or val(b) is None or val(a).dim() < 2 or val(b).dim() < 2:
            return None
        nb = max(val(a).dim(), val(b).dim()) - 2
        batch = "ABCDEFG"[:nb]
        la = batch[nb - (val(a).dim() - 2) :] + "xy"
        lb = batch[nb - (val(b).dim() - 2) :] + "yz"
        return Product(node, a, b, la, lb, batch + "xz")
    if node.target is aten.baddbmm.default and len(node.args) == 3:
        bias, a, b = node.args
        beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
        if beta not in (0, 1) or not is_number(alpha) or val(a) is None or val(b) is None:
            return None
        # beta=0 ignores the added tensor, NaN and inf included (diffusers passes torch.empty there)
        return Product(node, a, b, "Axy", "Ayz", "Axz", bias if beta == 1 else None, float(alpha))
    if node.target is aten.einsum.default and len(node.args[1]) == 2:
        eq = node.args[0].replace(" ", "")
        if "->" not in eq or val(node.args[1][0]) is None or val(node.args[1][1]) is None:
            return None
        lhs, out = eq.split("->")
        expanded = _expand_ellipsis([*lhs.split(","), out], [val(t).dim() for t in node.args[1]])
        if expanded is None:
            return None
        la, lb, out = expanded
        if any(len(set(s)) != len(s) for s in (la, lb, out)):
            return None  # a repeated label is a diagonal, not a product
        return Product(node, node.args[1][0], node.args[1][1], la, lb, out)
    return None


def _expand_ellipsis(sides: list[str], ranks: list[int]) -> list[str] | None:
    """Operand and output subscripts with `...` spelled out: the ellipsis axes get fresh letters,
    right-aligned as einsum broadcasts them ('... i d, ... j d -> ... i j' on 3-D operands reads as
    'Aid,Ajd->Aij'); the output's ellipsis is the widest operand's."""
    if not any("..." in s for s in sides):
        return sides
    used = set("".join(sides))
    fresh = "".join(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in used)
    widths = [r - len(s.replace("...", "")) if "..." in s else 0 for s, r in zip(sides, ranks)]
    if min(widths) < 0 or len(sides) != 3:
        return None
    pool = fresh[: max(widths)]
    widths.append(len(pool))
    return [s.replace("...", pool[len(pool) - w :] if w else "") for s, w in zip(sides, widths)]


@dataclass
class Operand:
    """A fused-op input before its layout steps: `node` with one label per axis; `scale` multiplies it."""

    node: Node
    labels: str
    scale: float = 1.0
    repeat: int = 1  # kv heads repeated this many times on the head axis (GQA), folded away


def _single_use(node: Node) -> bool:
    return len(node.users) == 1


def _peel_transpose(op: Operand, head: str) -> Operand | None:
    # transpose(x, i, j) -> x with labels i, j swapped
    n = op.node
    if n.target is not aten.transpose.int:
        return None
    rank = len(op.labels)
    i, j = (d % rank for d in n.args[1:3])
    labels = list(op.labels)
    labels[i], labels[j] = labels[j], labels[i]
    return replace(op, node=n.args[0], labels="".join(labels))


def _peel_permute(op: Operand, head: str) -> Operand | None:
    # permute(x, dims) -> x, the label of output axis k moving to input axis dims[k]
    n = op.node
    if n.target is not aten.permute.default:
        return None
    dims = [d % len(op.labels) for d in n.args[1]]
    labels = [""] * len(dims)
    for k, d in enumerate(dims):
        labels[d] = op.labels[k]
    return replace(op, node=n.args[0], labels="".join(labels))


def _peel_scale(op: Operand, head: str) -> Operand | None:
    # x * c, c * x, x / c with a Python number c -> x, the scale moving into the fused op
    n = op.node
    if n.target not in (aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar):
        return None
    x, c = n.args
    if isinstance(x, numbers.Number) and n.target is aten.mul.Tensor:
        x, c = c, x
    if not isinstance(x, Node) or not isinstance(c, numbers.Number) or isinstance(c, bool) or c == 0:
        return None
    if val(x) is None or val(x).shape != val(n).shape or val(x).dtype != val(n).dtype:
        return None
    factor = float(c) if n.target in (aten.mul.Tensor, aten.mul.Scalar) else 1.0 / float(c)
    return replace(op, node=x, scale=op.scale * factor)


def _peel_repeat_interleave(op: Operand, head: str) -> Operand | None:
    # repeat_interleave(x, r, dim=head axis) -> x with r query heads per kv head
    n = op.node
    if n.target is not aten.repeat_interleave.self_int or head not in op.labels:
        return None
    dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim")
    if dim is None or dim % len(op.labels) != op.labels.index(head) or not isinstance(n.args[1], int):
        return None
    return replace(op, node=n.args[0], repeat=op.repeat * n.args[1])


def _peel_expand_reshape(op: Operand, head: str) -> Operand | None:
    # reshape(expand(unsqueeze(x, a+1)), merged) -> x repeated along axis a (Llama's repeat_kv)
    n = op.node
    if n.target not in (aten.reshape.default, aten.view.default, aten._unsafe_view.default) or head not in op.labels:
        return None
    ex = n.args[0]
    if not isinstance(ex, Node) or ex.target is not aten.expand.default or not _single_use(ex):
        return None
    un = ex.args[0]
    if not isinstance(un, Node) or un.target is not aten.unsqueeze.default or not _single_use(un):
        return None
    x = un.args[0]
    xs, a = shape(x), op.labels.index(head)
    r = shape(ex)[un.args[1] % len(shape(ex))]
    want_ex = xs[: a + 1] + (r,) + xs[a + 1 :]
    want_out = xs[:a] + (xs[a] * r,) + xs[a + 1 :]
    if un.args[1] % len(want_ex) != a + 1 or shape(ex) != want_ex or shape(n) != want_out:
        return None
    return replace(op, node=x, repeat=op.repeat * r)


# Each peel takes one op off an operand; `peel` applies them until none fits.
PEELS = (_peel_transpose, _peel_permute, _peel_scale, _peel_repeat_interleave, _peel_expand_reshape)


def peel(op: Operand, head: str, allow_repeat: bool = True) -> Operand:
    """Walk up from a product operand through the ops the fused op absorbs (single-use nodes only)."""
    while _single_use(op.node) and op.node.op == "call_function":
        for rule in PEELS:
            if not allow_repeat and rule in (_peel_repeat_interleave, _peel_expand_reshape):
                continue
            nxt = rule(op, head)
            if nxt is not None:
                op = nxt
                break
        else:
            break
    return op


def peel_qkv(q: Operand, k: Operand, v: Operand, batch: str, sizes: dict[str, int]) -> tuple[Operand, ...]:
    """(q, k, v, kv_heads): the operands peeled up to what the fused op absorbs. Where k and v were repeated
    over the query heads by hand (repeat_interleave, expand + reshape) from one kv head count dividing the
    query heads, they are taken before the repeat and `kv_heads` is that count (the op folds the groups);
    otherwise the repeats stay in the graph and `kv_heads` is None."""
    head = "h" if "h" in batch else ""
    q, k_kv, v_kv = peel(q, head, allow_repeat=False), peel(k, head), peel(v, head)
    kv_heads = [shape(o.node)[o.labels.index("h")] if "h" in o.labels else 1 for o in (k_kv, v_kv)]
    if head and kv_heads[0] == kv_heads[1] and sizes["h"] % kv_heads[0] == 0:
        return q, k_kv, v_kv, kv_heads[0]
    return q, peel(k, head, allow_repeat=False), peel(v, head, allow_repeat=False), None


def layout_steps(op: Operand, target: str, sizes: dict[str, int], lead: int, keep_heads: str = "") -> list[Step]:
    """Steps that bring `op` ([labels]) to `target` order, size-1 axes for missing labels, broadcast
    axes expanded (except the kv head axis `keep_heads`), and `lead` leading unsqueezes (to rank 4)."""
    steps: list[Step] = []
    have = [lab for lab in target if lab in op.labels]
    if [op.labels.index(lab) for lab in have] != list(range(len(op.labels))):
        steps.append((aten.permute.default, ([op.labels.index(lab) for lab in have],)))
    cur = shape(op.node)
    dims = {lab: cur[op.labels.index(lab)] for lab in have}
    for pos, lab in enumerate(target):
        if lab not in op.labels:
            steps.append((aten.unsqueeze.default, (pos,)))
            dims[lab] = 1
    grow = [lab for lab in target if dims[lab] != sizes[lab] and lab != keep_heads]
    if grow:  # broadcast axes made explicit; -1 keeps the others (symbolic under torch.export)
        steps.append((aten.expand.default, ([sizes[lab] if lab in grow else -1 for lab in target],)))
    steps += [(aten.unsqueeze.default, (0,))] * lead
    return steps


def apply_steps(graph: Graph, x: Node, steps: list[Step]) -> Node:
    for op, args in steps:
        x = graph.call_function(op, (x, *args))
    return x


def is_number(x: object) -> bool:
    return isinstance(x, numbers.Number) and not isinstance(x, bool)
